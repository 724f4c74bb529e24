// Shared-library step: tetherRun(script: '...', timeout: '30m', env: [K: 'v'])
// runs `script` in the build container through tether and fails the step with the
// build's exact exit code. It hides where the client lives and which socket it uses.
def call(Map args = [:]) {
  String script = args.script ?: error('tetherRun: script is required')
  String timeout = args.timeout ?: '1h'
  Map envVars = args.env ?: [:]
  String tether = args.tether ?: "${env.WORKSPACE}/../.tether/tether"
  List<String> flags = ["--timeout", timeout]
  envVars.each { k, v -> flags += ["--env", "${k}=${v}"] }
  String quoted = flags.collect { "'" + it.toString().replace("'", "'\\''") + "'" }.join(' ')
  String body = "'" + script.replace("'", "'\\''") + "'"
  return sh(script: "\"${tether}\" run ${quoted} --sh ${body}", returnStatus: args.returnStatus ?: false)
}
