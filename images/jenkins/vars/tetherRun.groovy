// Shared-library step: tetherRun(script: '...', timeout: '30m', env: [K: 'v'])
// runs `script` in the build container through tether and fails the step with the
// build's exact exit code. It hides where the client lives and which socket it uses.
//
// Pass `id:` (unique per step of a build, e.g. "${env.BUILD_TAG}-push") to make the step
// safe to retry: if the agent restarts and Jenkins runs the step again, `tether run --id`
// follows the build that is already running (or finished) instead of starting it twice.
// Over the socket the client also reconnects by itself when the connection breaks.
//
// Pass `holdOnFailure: '30m'` to keep a failed build open for a look inside: the step's
// log prints the `tether shell --build ID` command to run and the step waits until
// someone runs `tether release ID` (optionally `--success`) or the time runs out. From
// outside the pod, reach the daemon through the build container's stdin:
//   tether shell --via 'kubectl attach -i POD -c kaniko' --build ID
//   tether release --via 'kubectl attach -i POD -c kaniko' ID
def call(Map args = [:]) {
  String script = args.script ?: error('tetherRun: script is required')
  String timeout = args.timeout ?: '1h'
  Map envVars = args.env ?: [:]
  String tether = args.tether ?: "${env.WORKSPACE}/../.tether/tether"
  List<String> flags = ["--timeout", timeout]
  if (args.id) {
    flags += ["--id", args.id.toString().replaceAll('[^A-Za-z0-9._-]', '-').take(64)]
  }
  if (args.holdOnFailure) {
    flags += ["--hold-on-failure=${args.holdOnFailure}"]
  }
  envVars.each { k, v -> flags += ["--env", "${k}=${v}"] }
  String quoted = flags.collect { "'" + it.toString().replace("'", "'\\''") + "'" }.join(' ')
  String body = "'" + script.replace("'", "'\\''") + "'"
  return sh(script: "\"${tether}\" run ${quoted} --sh ${body}", returnStatus: args.returnStatus ?: false)
}
