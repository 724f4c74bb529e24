// tether('kaniko') { tetherSh 'make' }: the tetherSh steps in the block run in the build
// container `kaniko`, as `sh` steps in container('kaniko') { } run there. The block sets
// TETHER_CONTAINER for its body, which is all it does: tetherSh(container: 'x') still
// picks another container, and a plain `sh` in the block still runs in the jnlp container.
def call(String name, Closure body) {
  if (!(name ==~ /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/) || name.length() > 63) {
    error("tether: '${name}' is not a container name (lowercase letters, digits and '-')")
  }
  return withEnv(["TETHER_CONTAINER=${name}"]) {
    body()
  }
}
