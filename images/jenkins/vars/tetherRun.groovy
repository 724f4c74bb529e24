// Shared-library step: tetherRun(script: '...', timeout: '30m', env: [K: 'v'])
// runs `script` in the build container through tether and fails the step with the
// build's exact exit code. It hides where the client lives and which socket it uses.
//
// The build gets an id made of the job, the build number and a per-step counter: if the
// agent or its connection restarts and Jenkins runs the step again, `tether run --id`
// follows the build that is already running (or finished) instead of starting it twice.
// Over the socket the client also reconnects by itself when the connection breaks.
def call(Map args = [:]) {
  String script = args.script ?: error('tetherRun: script is required')
  String timeout = args.timeout ?: '1h'
  Map envVars = args.env ?: [:]
  String tether = args.tether ?: "${env.WORKSPACE}/../.tether/tether"
  int step = (env.TETHER_STEP ?: '0') as int
  env.TETHER_STEP = "${step + 1}"
  String id = args.id ?: "${env.JOB_BASE_NAME}-${env.BUILD_NUMBER}-${step}".replaceAll('[^A-Za-z0-9._-]', '-').take(64)
  List<String> flags = ["--timeout", timeout, "--id", id]
  envVars.each { k, v -> flags += ["--env", "${k}=${v}"] }
  String quoted = flags.collect { "'" + it.toString().replace("'", "'\\''") + "'" }.join(' ')
  String body = "'" + script.replace("'", "'\\''") + "'"
  return sh(script: "\"${tether}\" run ${quoted} --sh ${body}", returnStatus: args.returnStatus ?: false)
}
