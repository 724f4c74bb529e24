// Runs a Jenkins pipeline file (declarative or scripted) outside Jenkins, with a small
// emulation of the Jenkins steps, so that tests execute the shared library in
// images/jenkins/vars as Jenkins would call it:
//
//   groovy integration-tests/jenkins/harness.groovy CONFIG.json
//
// CONFIG is JSON: {"vars": DIR, "pipeline": FILE, "env": {NAME: VALUE, ...},
// "cwd": DIR, "exec": [PREFIX...]}. Every DIR/NAME.groovy is a global step NAME: its
// call(...) methods get the arguments, as in Jenkins. "env" is the build's environment.
//
// `sh` runs EXEC... env -i NAME=VALUE... /bin/sh -c SCRIPT: the exec prefix puts it in
// a container as a user (e.g. runc exec, with "{cwd}" in any item replaced by the current
// directory), and `env -i` gives the script exactly the step's environment: the config's
// env with the pipeline's environment{}, env.X = ..., and withEnv changes, nothing else.
// Unlike Jenkins, the script runs without -xe. Its stdin is /dev/null; its stdout and
// stderr are the harness's own, unless returnStdout captures stdout.
//
// Emulated steps: sh, echo, error, env, withEnv, dir, pwd, timeout, isUnix, checkout, scm,
// node, stage, script, parallel, and the declarative pipeline { agent environment options
// stages { stage { environment steps post } } post { always success failure cleanup } }.
// Not emulated: CPS (no durability, no serialisation), the script security sandbox, real
// parallelism (branches run one after another), agents (agent, options, tools, when and
// the like are accepted and ignored), credentials, timeouts (a timeout's body just runs).
//
// The run ends with "Finished: SUCCESS" (exit 0); a pipeline error (error(), a failing sh)
// with "ERROR: MESSAGE" and "Finished: FAILURE" (exit 1); any other exception with its
// stack trace on stderr and "Finished: FAILURE" (exit 2).

import groovy.json.JsonSlurper
import org.codehaus.groovy.runtime.MethodClosure
import org.codehaus.groovy.runtime.StackTraceUtils

/** What Jenkins' AbortException is to a build: it fails it with a message, no stack trace. */
class PipelineError extends RuntimeException {
  PipelineError(String message) { super(message) }
}

/** The steps, and the build's state they share: environment and current directory. */
class Steps {
  static final List<String> NAMES = ['sh', 'echo', 'error', 'withEnv', 'dir', 'pwd', 'timeout',
      'isUnix', 'checkout', 'node', 'stage', 'script', 'parallel', 'pipeline']

  /** Set by the config, environment{} at the pipeline level and env.X = v. */
  final Map<String, String> base = new TreeMap<String, String>()
  /** withEnv and stage-level environment{}, innermost last; a null value unsets. */
  final List<Map<String, String>> overlays = []
  String cwd
  List<String> exec

  Map<String, String> environment() {
    Map<String, String> all = new TreeMap<String, String>(base)
    for (Map<String, String> overlay : overlays) {
      for (Map.Entry<String, String> e : overlay.entrySet()) {
        if (e.value == null) all.remove(e.key) else all.put(e.key, e.value)
      }
    }
    return all
  }

  void setEnv(String name, Object value) {
    if (value == null) base.remove(name) else base.put(name, value.toString())
  }

  Object sh(String script) { return sh([script: script]) }

  Object sh(Map args) {
    if (args.script == null) throw new PipelineError('sh: script is required')
    String script = args.script.toString()
    boolean returnStdout = args.returnStdout as boolean
    boolean returnStatus = args.returnStatus as boolean
    System.out.println('+ ' + (args.label ? args.label.toString() : script.split('\n', 2)[0]))
    List<String> cmd = []
    for (String item : exec) cmd.add(item.replace('{cwd}', cwd))
    cmd.addAll(['env', '-i'])
    for (Map.Entry<String, String> e : environment().entrySet()) cmd.add(e.key + '=' + e.value)
    cmd.addAll(['/bin/sh', '-c', script])
    Processes.Result r = Processes.run(cmd, exec ? null : cwd, returnStdout)
    if (returnStatus) return r.code
    if (r.code != 0) {
      if (returnStdout) System.out.print(r.output)
      throw new PipelineError("script returned exit code ${r.code}")
    }
    return returnStdout ? r.output : null
  }

  void echo(Object message) { System.out.println(String.valueOf(message)) }

  void error(Object message) { throw new PipelineError(String.valueOf(message)) }

  Object withEnv(List overrides, Closure body) {
    Map<String, String> overlay = [:]
    for (Object o : overrides) {
      String s = o.toString()
      int eq = s.indexOf('=')
      if (eq <= 0) throw new PipelineError("withEnv: expected NAME=VALUE, got '${s}'")
      String name = s.substring(0, eq)
      String value = s.substring(eq + 1)
      int plus = name.indexOf('+')
      if (plus > 0) { // PATH+EXTRA=/x prepends /x to PATH, as in Jenkins
        name = name.substring(0, plus)
        String old = environment().get(name)
        if (old) value = value + ':' + old
      }
      overlay.put(name, value == '' ? null : value) // Jenkins unsets a variable set to ''
    }
    return withOverlay(overlay, body)
  }

  Object withOverlay(Map<String, String> overlay, Closure body) {
    overlays.add(overlay)
    try {
      return body()
    } finally {
      overlays.remove(overlays.size() - 1)
    }
  }

  Object dir(Object path, Closure body) {
    String saved = cwd
    String p = path.toString()
    cwd = (p.startsWith('/') ? new File(p) : new File(cwd, p)).toPath().normalize().toString()
    try {
      return body()
    } finally {
      cwd = saved
    }
  }

  String pwd() { return cwd }
  String pwd(Map args) { return cwd }
  Object timeout(Object limit, Closure body) { return body() }
  boolean isUnix() { return true }
  void checkout(Object scm) { System.out.println('checkout (skipped by the harness: the workspace is prepared by the test)') }
  Object node(Closure body) { return body() }
  Object node(Object label, Closure body) { return body() }
  Object script(Closure body) { return body() }

  Object parallel(Map branches) {
    for (Map.Entry e : branches.entrySet()) {
      if (e.key == 'failFast') continue
      System.out.println("[Pipeline] branch: ${e.key}")
      ((Closure) e.value).call()
    }
    return null
  }

  Object parallel(Closure stages) { return stages() } // declarative parallel { stage ... }

  /** A scripted stage runs its body; a declarative one collects its directives first. */
  Object stage(Object name, Closure body) {
    System.out.println("[Pipeline] stage: ${name}")
    Directives d = new Directives()
    Object result = delegating(body, d)
    if (d.stepsBody == null && d.stagesBody == null) return result
    return withOverlay([:]) {
      if (d.environmentBody != null) environmentBlock(d.environmentBody, overlays.last())
      withPost(d.postBody) {
        if (d.stepsBody != null) d.stepsBody.call()
        if (d.stagesBody != null) d.stagesBody.call()
      }
    }
  }

  Object pipeline(Closure body) {
    Directives d = new Directives()
    delegating(body, d)
    if (d.environmentBody != null) environmentBlock(d.environmentBody, base)
    return withPost(d.postBody) {
      if (d.stagesBody != null) d.stagesBody.call()
    }
  }

  /** environment { NAME = value }: each assignment sets NAME in target; a later one sees earlier ones. */
  void environmentBlock(Closure body, Map<String, String> target) {
    delegating(body, new EnvironmentBlock(steps: this, target: target))
  }

  /** post { always { } success { } failure { } cleanup { } } around main, in Jenkins' order. */
  Object withPost(Closure post, Closure main) {
    PostBlock p = new PostBlock()
    if (post != null) delegating(post, p)
    Throwable failure = null
    Object result = null
    try {
      result = main()
    } catch (Throwable t) {
      failure = t
    }
    for (String condition : ['always', failure == null ? 'success' : 'failure', 'cleanup']) {
      if (p.conditions[condition] != null) p.conditions[condition].call()
    }
    if (failure != null) throw failure
    return result
  }

  static Object delegating(Closure body, Object delegate) {
    body.delegate = delegate
    body.resolveStrategy = Closure.DELEGATE_FIRST
    return body.call()
  }
}

/** Declarative directives of pipeline { } and stage { }: recorded, or accepted and ignored. */
class Directives {
  Closure environmentBody, stagesBody, stepsBody, postBody
  final String any = 'any', none = 'none'  // agent any, agent none
  void environment(Closure body) { environmentBody = body }
  void stages(Closure body) { stagesBody = body }
  void parallel(Closure body) { stagesBody = body }
  void steps(Closure body) { stepsBody = body }
  void post(Closure body) { postBody = body }
  void agent(Object spec) {}
  void options(Closure body) {}
  void tools(Closure body) {}
  void triggers(Closure body) {}
  void parameters(Closure body) {}
  void when(Closure body) {}
  void input(Closure body) {}
}

class PostBlock {
  Map<String, Closure> conditions = [:]
  void always(Closure body) { conditions.always = body }
  void success(Closure body) { conditions.success = body }
  void failure(Closure body) { conditions.failure = body }
  void cleanup(Closure body) { conditions.cleanup = body }
}

/** The delegate of environment { }: NAME = value sets, NAME reads an already set variable. */
class EnvironmentBlock extends GroovyObjectSupport {
  Steps steps
  Map<String, String> target
  void setProperty(String name, Object value) { target.put(name, value == null ? null : value.toString()) }
  Object getProperty(String name) {
    String value = steps.environment().get(name)
    if (value == null) throw new MissingPropertyException(name, EnvironmentBlock)
    return value
  }
}

/** env: env.X and env['X'] read (null when unset) and set the build's environment. */
class Env extends GroovyObjectSupport {
  private final Steps steps
  Env(Steps steps) { this.steps = steps }
  Object getProperty(String name) { return steps.environment().get(name) }
  void setProperty(String name, Object value) { steps.setEnv(name, value) }
  Object getAt(String name) { return getProperty(name) }
  void putAt(String name, Object value) { setProperty(name, value) }
  Map<String, String> getEnvironment() { return steps.environment() }
  String toString() { return 'env' }
}

/** Runs one command: stdin /dev/null, stderr inherited, stdout inherited or captured. */
class Processes {
  static class Result {
    int code
    String output
  }

  static Result run(List<String> cmd, String dir, boolean capture) {
    ProcessBuilder pb = new ProcessBuilder(cmd)
    if (dir != null) pb.directory(new File(dir))
    pb.redirectInput(ProcessBuilder.Redirect.from(new File('/dev/null')))
    pb.redirectError(ProcessBuilder.Redirect.INHERIT)
    pb.redirectOutput(capture ? ProcessBuilder.Redirect.PIPE : ProcessBuilder.Redirect.INHERIT)
    System.out.flush()
    System.err.flush()
    Process p = pb.start()
    Result r = new Result()
    if (capture) {
      InputStream stream = p.getInputStream()
      ByteArrayOutputStream buf = new ByteArrayOutputStream()
      byte[] chunk = new byte[65536]
      int n
      while ((n = stream.read(chunk)) >= 0) buf.write(chunk, 0, n)
      r.output = new String(buf.toByteArray(), 'UTF-8')
    }
    r.code = p.waitFor()
    return r
  }
}

PipelineError pipelineError(Throwable t) {
  for (Throwable c = t; c != null; c = c.cause) {
    if (c instanceof PipelineError) return (PipelineError) c
  }
  return null
}

// Java 17 encodes System.out in the locale's charset (ASCII under LANG=C); the build's
// output is UTF-8, and a direct, unbuffered stream keeps it in order with the steps' own.
System.setOut(new PrintStream(new FileOutputStream(FileDescriptor.out), true, 'UTF-8'))
System.setErr(new PrintStream(new FileOutputStream(FileDescriptor.err), true, 'UTF-8'))

if (args.length != 1) {
  System.err.println('usage: groovy harness.groovy CONFIG.json')
  System.exit(2)
}
int exitCode = 0
try {
  Map cfg = (Map) new JsonSlurper().parse(new File(args[0]))
  Steps steps = new Steps()
  for (Map.Entry e : ((Map) (cfg.env ?: [:])).entrySet()) steps.setEnv(e.key.toString(), e.value)
  steps.cwd = (cfg.cwd ?: cfg.env?.WORKSPACE ?: System.getProperty('user.dir')).toString()
  steps.exec = ((List) (cfg.exec ?: [])).collect { it.toString() }

  // One binding for the pipeline and every var: a name a script does not define resolves
  // there, so steps and vars are found from any script and from any closure, whose owner
  // chain ends at the script that wrote it.
  Binding binding = new Binding()
  for (String name : Steps.NAMES) binding.setVariable(name, new MethodClosure(steps, name))
  binding.setVariable('env', new Env(steps))
  binding.setVariable('scm', 'scm (a placeholder of the harness)')
  GroovyShell shell = new GroovyShell(binding)
  File[] files = new File(cfg.vars.toString()).listFiles()
  if (files == null) throw new FileNotFoundException("vars: no directory ${cfg.vars}")
  for (File f : files.sort { it.name }) {
    if (!f.name.endsWith('.groovy')) continue
    String name = f.name.substring(0, f.name.length() - '.groovy'.length())
    Script library = shell.parse(f.getText('UTF-8'), name)
    binding.setVariable(name, { Object[] callArgs -> library.invokeMethod('call', callArgs) })
  }
  Script pipeline = shell.parse(new File(cfg.pipeline.toString()).getText('UTF-8'), 'WorkflowScript')
  pipeline.run()
  println 'Finished: SUCCESS'
} catch (Throwable t) {
  PipelineError e = pipelineError(t)
  if (e != null) {
    println "ERROR: ${e.message}"
    exitCode = 1
  } else {
    StackTraceUtils.deepSanitize(t).printStackTrace()
    exitCode = 2
  }
  println 'Finished: FAILURE'
}
System.out.flush()
System.exit(exitCode)
