// tetherSh: like `sh`, but the script runs in a build container of the agent pod.
//
//   tether('kaniko') { tetherSh 'make' }
//   tetherSh(container: 'kaniko', script: 'make test', timeout: '30m', id: "${env.BUILD_TAG}-test")
//   String version = tetherSh(script: 'git describe', returnStdout: true).trim()
//
// Each build container runs `tether serve` with its socket on the shared workspace
// volume, at $TETHER_DIR/NAME.sock (inside a tetherRelay('NAME') { } block, the relay's
// socket instead); the client is $TETHER_DIR/tether. TETHER_DIR is set
// in the jnlp container by images/jenkins/pod-template.yaml. The step hands `sh` one
// `tether run` command: the script runs in the build container, and `sh` in the jnlp
// container streams its output and ends with its exact exit code. No Kubernetes exec.
//
// It mirrors `container('kaniko') { sh '...' }`: a block names the container and the
// step reads like `sh`. It is a separate step rather than an override of `sh`, so a plain
// `sh` keeps running in the jnlp container and loading the library changes the meaning
// of nobody's pipeline. A failing script fails the step with `script returned exit code
// N`; returnStdout and returnStatus behave as they do for `sh`.
//
// Parameters (a single String argument is the script):
//   script         the shell script (required), run with the container's sh
//   container      build container; default: the enclosing tether('NAME') { } block
//   returnStdout, returnStatus, label
//                  passed to `sh` as given; the label also names the build
//   timeout        cancel the build after this long: '90s', '30m', '1h30m' (exit 124)
//   id             the build's id, for retries (below); characters other than
//                  A-Za-z0-9._- become '-'
//   secrets        names of variables (e.g. from withCredentials) passed as secrets: set
//                  in the build and masked as **** in its output by tether
//   env            [K: 'v'] sets variables; ['NAME', ...] passes their values from here
//   envPrefixes    pass every variable whose name starts with one of these
//                  (default BUILD_ JOB_ GIT_ BRANCH_ CHANGE_ TAG_)
//   holdOnFailure  true or a duration ('30m'): keep a failed build open for
//                  `tether shell --build ID` until `tether release ID` or the time is up
//   user           numeric 'UID' or 'UID:GID' to run the build as
//   workdir        absolute directory to run in; default the current directory, so
//                  dir('sub') { tetherSh 'make' } runs in that subdirectory
//
// Environment: the build has its container's environment plus what is passed: the
// prefixes above and WORKSPACE, NODE_NAME, EXECUTOR_NUMBER, JENKINS_URL and CI, which
// build scripts read to find the checkout and to know they run in CI. Never a JENKINS_
// prefix: the jnlp container holds JENKINS_SECRET, the agent's own credential.
//
// Retries: with `id`, a step run again (e.g. after an agent restart) follows the build
// already running or finished under that id instead of starting it twice. The id is
// explicit because an automatic per-step counter would race in parallel branches; keep
// it unique within the build, e.g. "${env.BUILD_TAG}-push".

def call(String script) {
  return call([script: script])
}

def call(Map args) {
  List<String> known = ['script', 'container', 'returnStdout', 'returnStatus', 'label', 'timeout',
                        'id', 'secrets', 'env', 'envPrefixes', 'holdOnFailure', 'user', 'workdir']
  for (Object key : args.keySet()) {
    if (!known.contains(key.toString())) {
      error("tetherSh: unknown parameter '${key}' (known: ${known.join(', ')})")
    }
  }
  if (!args.script) {
    error('tetherSh: script is required')
  }
  String container = args.container ?: env.TETHER_CONTAINER
  if (!container) {
    error("tetherSh: no container: pass container: 'NAME' or put the step in a tether('NAME') { } block")
  }
  checkContainer(container)
  String tetherDir = env.TETHER_DIR
  if (!tetherDir) {
    error("tetherSh: TETHER_DIR is not set; the pod template's jnlp container sets it (images/jenkins/pod-template.yaml)")
  }

  // tetherRelay sets TETHER_SOCKETS: its relays' sockets, one per container.
  String sockets = env.TETHER_SOCKETS ?: tetherDir
  List<String> cmd = [quote(tetherDir + '/tether'), 'run', '--socket', quote(sockets + '/' + container + '.sock')]
  if (args.workdir) {
    if (!args.workdir.toString().startsWith('/')) {
      error("tetherSh: workdir must be an absolute path, got '${args.workdir}'")
    }
    cmd += ['--workdir', quote(args.workdir)]
  } else {
    cmd += ['--workdir', '"$PWD"']
  }
  if (args.label) {
    cmd += ['--name', quote(args.label)]
  }
  if (args.id != null) {
    String id = args.id.toString().replaceAll('[^A-Za-z0-9._-]', '-').replaceAll('^[.-]+', '').take(64)
    if (!id) {
      error("tetherSh: id '${args.id}' has no usable characters (A-Za-z0-9._-)")
    }
    cmd += ['--id', quote(id)]
  }
  if (args.timeout != null) {
    cmd += ['--timeout', quote(args.timeout)]
  }
  if (args.holdOnFailure instanceof Boolean) {
    if (args.holdOnFailure) {
      cmd += ['--hold-on-failure']
    }
  } else if (args.holdOnFailure != null) {
    cmd += [quote('--hold-on-failure=' + args.holdOnFailure)]
  }
  if (args.user != null) {
    if (!(args.user.toString() ==~ /^[0-9]+(:[0-9]+)?$/)) {
      error("tetherSh: user must be a numeric 'UID' or 'UID:GID', got '${args.user}'")
    }
    cmd += ['--user', quote(args.user)]
  }

  List prefixes = args.containsKey('envPrefixes') ? args.envPrefixes : ['BUILD_', 'JOB_', 'GIT_', 'BRANCH_', 'CHANGE_', 'TAG_']
  for (String prefix : names('envPrefixes', prefixes)) {
    if ('JENKINS_SECRET'.startsWith(prefix)) {
      error("tetherSh: envPrefixes: '${prefix}' would pass JENKINS_SECRET, the agent's own credential")
    }
    cmd += ['--env-prefix', quote(prefix)]
  }
  for (String name : ['WORKSPACE', 'NODE_NAME', 'EXECUTOR_NUMBER', 'JENKINS_URL', 'CI']) {
    cmd += ['--env', quote(name)]
  }
  if (args.env instanceof Map) {
    for (Object key : args.env.keySet()) {
      Object value = args.env[key]
      cmd += ['--env', quote(checkName('env', key) + '=' + (value == null ? '' : value.toString()))]
    }
  } else if (args.env != null) {
    for (String name : names('env', args.env)) {
      cmd += ['--env', quote(name)]
    }
  }
  if (args.secrets != null) {
    for (String name : names('secrets', args.secrets)) {
      cmd += ['--secret-env', quote(name)]
    }
  }
  cmd += ['--sh', quote(args.script)]

  Map shArgs = [script: cmd.join(' ')]
  if (args.containsKey('returnStdout')) {
    shArgs.returnStdout = args.returnStdout
  }
  if (args.containsKey('returnStatus')) {
    shArgs.returnStatus = args.returnStatus
  }
  if (args.label) {
    shArgs.label = args.label
  }
  return sh(shArgs)
}

// One shell word: single-quoted, each ' written as '\''.
String quote(Object value) {
  return "'" + value.toString().replace("'", "'\\''") + "'"
}

void checkContainer(Object name) {
  String s = name.toString()
  if (!(s ==~ /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/) || s.length() > 63) {
    error("tetherSh: '${s}' is not a container name (lowercase letters, digits and '-')")
  }
}

String checkName(String param, Object name) {
  String s = name == null ? '' : name.toString()
  if (!(s ==~ /^[A-Za-z_][A-Za-z0-9_]*$/)) {
    error("tetherSh: ${param}: '${s}' is not a variable name")
  }
  return s
}

List<String> names(String param, Object value) {
  if (!(value instanceof List)) {
    error("tetherSh: ${param} must be a list of variable names")
  }
  List<String> out = []
  for (Object name : value) {
    out.add(checkName(param, name))
  }
  return out
}
