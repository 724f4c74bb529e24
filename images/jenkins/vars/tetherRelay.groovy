// tetherRelay('kaniko') { ... }: the tetherSh steps to `kaniko` in the block go over the
// build container's stdin (`kubectl attach -i`) instead of a socket on a shared volume,
// all of them, parallel branches included, through ONE `tether relay` started in the
// jnlp container for the block and stopped after it. Each step is then a local socket
// connection to the relay, not a `kubectl attach` of its own; a dropped attach stream
// (an API server restart) is taken up again by the relay, and every step resumes
// where it was.
//
// It needs, in the jnlp container: the client ($TETHER_DIR/tether), `kubectl` on PATH
// (or $KUBECTL) with the rights to attach to pods of its namespace, and POD_NAME (from
// the downward API); images/jenkins/pod-template-attach.yaml sets all three up.
def call(String container, Closure body) {
  if (!(container ==~ /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/) || container.length() > 63) {
    error("tetherRelay: '${container}' is not a container name (lowercase letters, digits and '-')")
  }
  if (!env.TETHER_DIR) {
    error("tetherRelay: TETHER_DIR is not set; the pod template's jnlp container sets it")
  }
  if (!env.POD_NAME) {
    error("tetherRelay: POD_NAME is not set; the pod template gives it to the jnlp container from the downward API")
  }
  String dir = (env.WORKSPACE_TMP ?: "${env.WORKSPACE}@tmp") + '/tether-relay'
  String sock = "${dir}/${container}.sock"
  // JENKINS_NODE_COOKIE: the relay outlives this sh step (the block's steps use it);
  // it is stopped in the finally below.
  sh(label: "tether relay for ${container}", script: """
    mkdir -p '${dir}'
    JENKINS_NODE_COOKIE=dontKillMe "\$TETHER_DIR/tether" relay \\
      --via "exec \${KUBECTL:-kubectl} attach -i \$POD_NAME -c ${container}" \\
      --listen '${sock}' > '${dir}/${container}.log' 2>&1 &
    echo \$! > '${dir}/${container}.pid'
    i=0
    while [ ! -S '${sock}' ]; do
      if ! kill -0 \$(cat '${dir}/${container}.pid') 2>/dev/null || [ \$i -ge 600 ]; then
        cat '${dir}/${container}.log' >&2
        exit 1
      fi
      i=\$((i + 1))
      sleep 0.1
    done
  """)
  try {
    return withEnv(["TETHER_SOCKETS=${dir}"]) {
      body()
    }
  } finally {
    sh(label: "stop the tether relay for ${container}",
       script: "kill \$(cat '${dir}/${container}.pid') 2>/dev/null; rm -f '${dir}/${container}.pid'; true")
  }
}
