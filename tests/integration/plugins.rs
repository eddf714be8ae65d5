//! Tool plugins end to end: real child processes under the real sandbox, speaking MCP over
//! stdio, managed by `PluginRegistry`, including plugins that misbehave on purpose
//! (`tests/fixtures/plugins/mcp_server.py` documents each tool).
//!
//! Manifests are written at test time into a temporary plugins folder, with the paths of the
//! Python interpreter found on this machine, so the fixtures work on any checkout.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use phi3d::plugins::{PluginRegistry, ToolInfo, ToolOutcome};
use phi3d::metrics::Metrics;
use phi3d::sandbox::{KernelSupport, Requirement};
use serde_json::json;

/// The fixture MCP server.
fn server_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/plugins/mcp_server.py").canonicalize().unwrap()
}

/// A Python 3 the sandboxed plugin can run, and what it must be allowed to read.
struct Python {
    exe: PathBuf,
    read: Vec<PathBuf>,
}

fn python() -> &'static Python {
    static PYTHON: OnceLock<Python> = OnceLock::new();
    PYTHON.get_or_init(|| {
        // When phi3d runs as root, plugins run as an unprivileged user, which cannot enter a
        // Python installed under /root (pyenv): prefer the system's.
        let exe = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("python3"));
        let out = std::process::Command::new(&exe)
            .args(["-c", "import os, sys; print(os.path.realpath(sys.executable)); print(sys.prefix); print(sys.base_prefix); print(sys.exec_prefix)"])
            .output()
            .expect("python3 is needed for the plugin tests");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines().map(PathBuf::from);
        let exe = lines.next().expect("python3 printed its executable");
        let mut read: Vec<PathBuf> = lines.collect();
        // The interpreter's shared libraries, and the fixture itself.
        read.extend(["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"].map(PathBuf::from));
        read.push(server_script().parent().unwrap().to_path_buf());
        read.retain(|p| p.exists());
        read.sort();
        read.dedup();
        Python { exe, read }
    })
}

/// A manifest running the fixture server with `args`, plus extra `[permissions]` lines.
///
/// Run as root, the sandbox gives each plugin a uid of its own, and RLIMIT_NPROC counts all
/// processes of that uid; without root, every plugin and phi3d share one uid, and the tests
/// run side by side, so a small `max_processes` would make them fail to start (EAGAIN): the
/// default here is generous unless a test sets it.
pub(crate) fn manifest(args: &[&str], permissions: &str) -> String {
    manifest_reading(args, &[], permissions)
}

/// [`manifest`], with `extra_read` readable besides what Python needs (`[permissions]` can
/// hold only one `read` list, so it cannot come in `permissions`).
fn manifest_reading(args: &[&str], extra_read: &[&Path], permissions: &str) -> String {
    let python = python();
    let processes = if permissions.contains("max_processes") { "" } else { "max_processes = 10000\n" };
    let mut all_args = vec![server_script().display().to_string()];
    all_args.extend(args.iter().map(|a| a.to_string()));
    let read = python.read.iter().map(PathBuf::as_path).chain(extra_read.iter().copied());
    let read: Vec<String> = read.map(|p| p.display().to_string()).collect();
    format!(
        "command = {:?}\nargs = {:?}\n[env]\nGREETING = \"hello\"\n[permissions]\nread = {:?}\n{processes}{permissions}\n",
        python.exe.display().to_string(),
        all_args,
        read
    )
}

/// A temporary plugins folder.
struct Plugins {
    dir: tempfile::TempDir,
}

impl Plugins {
    fn new() -> Self {
        Plugins { dir: tempfile::tempdir().unwrap() }
    }

    fn write(&self, file: &str, text: &str) {
        // Write then rename, as a package manager would, so a half-written file is never seen.
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(file)).unwrap();
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.dir.path().join(file)).unwrap();
    }

    async fn start(&self) -> PluginRegistry {
        PluginRegistry::start(self.dir.path().to_path_buf(), KernelSupport::probe(), Requirement::BestEffort, Metrics::default())
            .await
            .expect("the registry starts")
    }
}

/// One registry with one plugin `t` running the fixture with `args` and `permissions`.
async fn one_plugin(args: &[&str], permissions: &str) -> (Plugins, PluginRegistry) {
    let plugins = Plugins::new();
    plugins.write("t.toml", &manifest(args, permissions));
    let registry = plugins.start().await;
    (plugins, registry)
}

fn names(tools: &[ToolInfo]) -> Vec<&str> {
    tools.iter().map(|t| t.qualified_name.as_str()).collect()
}

/// Polls `registry.tools()` until `check` holds (hot reload is asynchronous).
async fn eventually(registry: &PluginRegistry, what: &str, check: impl Fn(&[ToolInfo]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tools = registry.tools().await;
        if check(&tools) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: tools are still {:?}", names(&tools));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ok(outcome: &ToolOutcome) -> &str {
    assert!(!outcome.is_error, "the call failed: {}", outcome.content);
    &outcome.content
}

fn err(outcome: &ToolOutcome) -> &str {
    assert!(outcome.is_error, "the call should have failed, got: {}", outcome.content);
    &outcome.content
}

/// Live (not zombie) processes whose command line holds `marker`.
fn live_processes(marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if !String::from_utf8_lossy(&cmdline).contains(marker) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        if state.is_some_and(|s| s != 'Z') {
            pids.push(pid);
        }
    }
    pids
}

async fn wait_until_no_process(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !live_processes(marker).is_empty() {
        assert!(Instant::now() < deadline, "processes {:?} of {marker} outlived their plugin", live_processes(marker));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn marker(name: &str) -> String {
    format!("--marker={name}-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_behaved_plugin_lists_and_answers() {
    let (_dir, registry) = one_plugin(&["--tools=echo,env,fail"], "").await;
    let tools = registry.tools().await;
    assert_eq!(names(&tools), ["t.echo", "t.env", "t.fail"]);
    let echo = &tools[0];
    assert_eq!((echo.plugin.as_str(), echo.name.as_str()), ("t", "echo"));
    assert_eq!(echo.description, "the echo test tool");
    assert_eq!(echo.input_schema["type"], "object");
    assert!(!echo.protections.is_empty());

    let outcome = registry.call("t.echo", json!({"text": "hi there"})).await;
    assert_eq!(ok(&outcome), "hi there");
    assert!(outcome.duration > Duration::ZERO);

    // The manifest's [env] is all it gets (PATH is the sandbox's default, LC_CTYPE Python's own).
    let env: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(ok(&registry.call("t.env", json!({})).await)).unwrap();
    assert_eq!(env["GREETING"], "hello");
    for name in env.keys() {
        assert!(["GREETING", "PATH", "LC_CTYPE"].contains(&name.as_str()), "leaked variable {name}");
    }

    // A tool's own error result is an error outcome.
    assert_eq!(err(&registry.call("t.fail", json!({})).await), "it went wrong");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tools_and_bad_arguments_are_errors_naming_the_tools() {
    let (_dir, registry) = one_plugin(&["--tools=echo"], "").await;
    for name in ["t.nope", "nope.echo", "echo", ""] {
        let message = err(&registry.call(name, json!({})).await).to_string();
        assert!(message.contains("there is no tool") && message.contains("t.echo"), "{message}");
    }
    let message = err(&registry.call("t.echo", json!([1, 2])).await).to_string();
    assert!(message.contains("must be a JSON object"), "{message}");
    // Null arguments are no arguments.
    assert_eq!(ok(&registry.call("t.echo", serde_json::Value::Null).await), "");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_timeout_is_stopped_and_the_others_carry_on() {
    let plugins = Plugins::new();
    plugins.write("t.toml", &manifest(&["--tools=echo,spin,silent"], "timeout_seconds = 3\ncpu_seconds = 30"));
    plugins.write("other.toml", &manifest(&["--tools=echo"], ""));
    let registry = plugins.start().await;
    registry.tools().await;

    for tool in ["t.spin", "t.silent"] {
        let started = Instant::now();
        let (stuck, other) =
            tokio::join!(registry.call(tool, json!({})), registry.call("other.echo", json!({"text": "still here"})));
        let message = err(&stuck);
        assert_eq!(message, format!("the tool {tool} did not answer within 3 s and was stopped"));
        assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
        assert_eq!(ok(&other), "still here");
        // The plugin is started again for the next call: the 1 s backoff and the start come out
        // of the call's 3 s.
        assert_eq!(ok(&registry.call("t.echo", json!({"text": "back"})).await), "back");
    }
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_call_is_an_error_with_the_exit_and_stderr_and_the_plugin_restarts() {
    let (_dir, registry) = one_plugin(&["--tools=echo,crash"], "timeout_seconds = 5").await;
    let message = err(&registry.call("t.crash", json!({})).await).to_string();
    assert!(message.contains("stopped during the call to t.crash"), "{message}");
    assert!(message.contains("exited with status 3"), "{message}");
    assert!(message.contains("about to crash"), "{message}");
    assert_eq!(ok(&registry.call("t.echo", json!({"text": "again"})).await), "again");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_rpc_is_treated_as_a_crash() {
    let (_dir, registry) = one_plugin(&["--tools=echo,garbage"], "timeout_seconds = 5").await;
    let message = err(&registry.call("t.garbage", json!({})).await).to_string();
    assert!(message.contains("malformed JSON-RPC") && message.contains("this is not JSON-RPC"), "{message}");
    assert_eq!(ok(&registry.call("t.echo", json!({"text": "fine"})).await), "fine");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_output_is_cut_and_the_cut_reported() {
    let (_dir, registry) = one_plugin(&["--tools=huge"], "max_output_bytes = 1000").await;
    let outcome = registry.call("t.huge", json!({"bytes": 200_000})).await;
    let text = err(&outcome);
    assert!(text.starts_with(&"x".repeat(1000)), "{}", &text[..50]);
    assert!(text.ends_with("\n[output cut at 1000 bytes]"), "{}", &text[text.len() - 50..]);
    assert_eq!(text.len(), 1000 + "\n[output cut at 1000 bytes]".len());
    // A small result is not cut.
    assert_eq!(ok(&registry.call("t.huge", json!({"bytes": 10})).await), "xxxxxxxxxx");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_without_newlines_cannot_exhaust_memory() {
    let (_dir, registry) = one_plugin(&["--tools=echo,flood"], "max_output_bytes = 1000\ntimeout_seconds = 20").await;
    let started = Instant::now();
    let message = err(&registry.call("t.flood", json!({"bytes": 256 << 20})).await).to_string();
    assert!(message.contains("longer than 1048576 bytes"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(ok(&registry.call("t.echo", json!({"text": "ok"})).await), "ok");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_never_completes_the_handshake_is_reported() {
    let plugins = Plugins::new();
    plugins.write("hang.toml", &manifest(&["--hang-init"], "timeout_seconds = 1"));
    plugins.write("junk.toml", &manifest(&["--garbage-init"], "timeout_seconds = 1"));
    plugins.write("good.toml", &manifest(&["--tools=echo"], ""));
    let registry = plugins.start().await;
    assert_eq!(names(&registry.tools().await), ["good.echo"]);
    let message = err(&registry.call("hang.echo", json!({})).await).to_string();
    assert!(message.contains("did not complete the MCP handshake within 1 s"), "{message}");
    let message = err(&registry.call("junk.echo", json!({})).await).to_string();
    assert!(message.contains("malformed JSON-RPC"), "{message}");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_plugin_kills_what_it_left_running() {
    let marker = marker("background");
    // Processes are counted per user across all plugins, so leave room for the other tests'.
    let (plugins, registry) = one_plugin(&["--tools=background", &marker], "max_processes = 10000").await;
    assert_eq!(ok(&registry.call("t.background", json!({})).await), "started");
    assert_eq!(live_processes(&marker).len(), 2, "the plugin and its background child");

    // Unloading the plugin stops its whole process group.
    plugins.remove("t.toml");
    wait_until_no_process(&marker).await;
    eventually(&registry, "the plugin is unloaded", |tools| tools.is_empty()).await;
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_every_plugin() {
    let marker = marker("shutdown");
    let plugins = Plugins::new();
    plugins.write("a.toml", &manifest(&["--tools=background", &marker], "max_processes = 10000"));
    plugins.write("b.toml", &manifest(&["--tools=echo", &marker], ""));
    let registry = plugins.start().await;
    assert_eq!(ok(&registry.call("a.background", json!({})).await), "started");
    registry.tools().await;
    assert_eq!(live_processes(&marker).len(), 3);
    registry.shutdown().await;
    wait_until_no_process(&marker).await;
    assert!(err(&registry.call("b.echo", json!({})).await).contains("shutting down"));
    assert!(registry.tools().await.is_empty());
}

/// phi3d ending in any way ends every plugin process and what the plugins forked: SIGTERM
/// through the shutdown, SIGKILL through the parent-death signal and the plugin watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_and_their_children_end_with_phi3d_however_it_ends() {
    for signal in ["TERM", "KILL"] {
        let marker = marker(&format!("phi3d-{signal}"));
        let plugins = Plugins::new();
        let manifest = manifest(&["--tools=echo", "--background-at-start", &marker], "");
        plugins.write("t.toml", &format!("start = \"startup\"\n{manifest}"));
        let mut daemon =
            crate::common::tiny_daemon().arg("--plugins-dir").arg(plugins.dir.path().to_str().unwrap()).start().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while live_processes(&marker).len() < 2 {
            assert!(Instant::now() < deadline, "the plugin did not start: {}", daemon.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if signal == "TERM" {
            daemon.terminate(Duration::from_secs(20)).await;
        } else {
            // Dropping the handle SIGKILLs the daemon: no shutdown code runs.
            drop(daemon);
        }
        wait_until_no_process(&marker).await;
    }
}

/// A start in progress holds the plugin's state for up to its timeout; a listing does not wait
/// for it, and the other plugins' tools are listed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_is_starting_never_holds_up_a_listing() {
    let plugins = Plugins::new();
    let hanging = manifest(&["--tools=echo", "--hang-init"], "timeout_seconds = 8");
    plugins.write("slow.toml", &format!("start = \"startup\"\n{hanging}"));
    plugins.write("b.toml", &manifest(&["--tools=echo"], ""));
    let registry = plugins.start().await;
    // Let the background start of `slow` begin.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let tools = registry.tools().await;
    assert!(started.elapsed() < Duration::from_secs(4), "the listing waited {:?} for a start", started.elapsed());
    assert_eq!(names(&tools), ["b.echo"]);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_registry_stops_its_plugins() {
    let marker = marker("dropped");
    let (_plugins, registry) = one_plugin(&["--tools=echo", &marker], "").await;
    assert_eq!(ok(&registry.call("t.echo", json!({"text": "x"})).await), "x");
    assert_eq!(live_processes(&marker).len(), 1);
    drop(registry);
    wait_until_no_process(&marker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_contained() {
    let marker = marker("forkbomb");
    // A name no other test uses, so that no other plugin shares its uid and process count.
    let plugins = Plugins::new();
    plugins.write("bomb.toml", &manifest(&["--tools=forkbomb", &marker], "max_processes = 5"));
    let registry = plugins.start().await;
    let text = ok(&registry.call("bomb.forkbomb", json!({"count": 200})).await).to_string();
    let forked: u32 = text.strip_prefix("forked ").unwrap().parse().unwrap();
    assert!(forked < 5, "{forked} forks got past max_processes = 5");
    registry.shutdown().await;
    wait_until_no_process(&marker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_contained() {
    let (_dir, registry) = one_plugin(&["--tools=echo,hog"], "memory_mb = 256").await;
    assert_eq!(err(&registry.call("t.hog", json!({"mb": 2048})).await), "MemoryError");
    // Within its limit it works, and the plugin survived.
    assert_eq!(ok(&registry.call("t.hog", json!({"mb": 16})).await), "allocated");
    assert_eq!(ok(&registry.call("t.echo", json!({"text": "alive"})).await), "alive");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_tool_list_is_picked_up() {
    let (_dir, registry) = one_plugin(&["--tools=grow"], "").await;
    assert_eq!(names(&registry.tools().await), ["t.grow"]);
    assert_eq!(ok(&registry.call("t.grow", json!({})).await), "grew");
    eventually(&registry, "the new tool is listed", |tools| names(tools) == ["t.grow", "t.grown"]).await;
    assert_eq!(ok(&registry.call("t.grown", json!({})).await), "I am new");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_are_limited() {
    let (_dir, registry) = one_plugin(&["--tools=slow"], "timeout_seconds = 5\nmax_concurrent_calls = 1").await;
    registry.tools().await;
    let started = Instant::now();
    let (a, b) =
        tokio::join!(registry.call("t.slow", json!({"seconds": 1})), registry.call("t.slow", json!({"seconds": 1})));
    assert_eq!((ok(&a), ok(&b)), ("done", "done"));
    assert!(started.elapsed() >= Duration::from_secs(2), "the calls overlapped: {:?}", started.elapsed());
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_plugins_start_at_once_and_lazy_ones_when_needed() {
    let lazy = marker("lazy");
    let eager = marker("eager");
    let plugins = Plugins::new();
    plugins.write("lazy.toml", &manifest(&["--tools=echo", &lazy], ""));
    plugins.write("eager.toml", &format!("start = \"startup\"\n{}", manifest(&["--tools=echo", &eager], "")));
    let registry = plugins.start().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while live_processes(&eager).is_empty() {
        assert!(Instant::now() < deadline, "the startup plugin did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(live_processes(&lazy).is_empty(), "the lazy plugin started before it was needed");
    // A listing leaves out a plugin still starting (it does not wait for its handshake): the
    // eager one's process may be up before it has answered.
    eventually(&registry, "both listed", |tools| names(tools) == ["eager.echo", "lazy.echo"]).await;
    assert_eq!(live_processes(&lazy).len(), 1);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_hot_reloaded() {
    let plugins = Plugins::new();
    let registry = plugins.start().await;
    assert!(registry.tools().await.is_empty());

    // Added: its tools appear.
    plugins.write("a.toml", &manifest(&["--tools=echo"], ""));
    eventually(&registry, "a added", |tools| names(tools) == ["a.echo"]).await;

    // Changed: restarted with the new tool list.
    plugins.write("a.toml", &manifest(&["--tools=echo,fail"], ""));
    eventually(&registry, "a changed", |tools| names(tools) == ["a.echo", "a.fail"]).await;

    // A bad manifest is rejected and the others are untouched.
    plugins.write("bad.toml", "command = \"/bin/true\"\n[permissions]\nnetwork = 5\n");
    plugins.write("b.toml", &manifest(&["--tools=echo"], ""));
    eventually(&registry, "b added", |tools| names(tools) == ["a.echo", "a.fail", "b.echo"]).await;

    // A manifest that turns bad keeps its running version.
    plugins.write("a.toml", "command = 5");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(names(&registry.tools().await), ["a.echo", "a.fail", "b.echo"]);
    assert_eq!(ok(&registry.call("a.echo", json!({"text": "kept"})).await), "kept");

    // A second manifest claiming a loaded name is rejected.
    plugins.write("z.toml", &format!("name = \"b\"\n{}", manifest(&["--tools=fail"], "")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(names(&registry.tools().await), ["a.echo", "a.fail", "b.echo"]);

    // Removed: gone.
    plugins.remove("a.toml");
    eventually(&registry, "a removed", |tools| names(tools) == ["b.echo"]).await;
    let message = err(&registry.call("a.echo", json!({})).await).to_string();
    assert!(message.contains("there is no tool") && message.contains("b.echo"), "{message}");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lets_calls_in_flight_finish() {
    let (plugins, registry) = one_plugin(&["--tools=slow"], "timeout_seconds = 10").await;
    registry.tools().await;
    let call = tokio::spawn({
        let registry = registry.clone();
        async move { registry.call("t.slow", json!({"seconds": 2})).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    plugins.write("t.toml", &manifest(&["--tools=slow,echo"], "timeout_seconds = 10"));
    eventually(&registry, "t changed", |tools| names(tools) == ["t.echo", "t.slow"]).await;
    assert_eq!(ok(&call.await.unwrap()), "done");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_plugins_folder_means_no_tools() {
    let registry = PluginRegistry::start(
        PathBuf::from("/nonexistent/phi3d/plugins.d"),
        KernelSupport::probe(),
        Requirement::BestEffort,
        Metrics::default(),
    )
    .await
    .unwrap();
    assert!(registry.tools().await.is_empty());
    assert!(err(&registry.call("clock.now", json!({})).await).contains("no tools are available"));
}

/// A temporary directory with `mode`, and a file `file` in it holding `text` that anyone may
/// read: file permissions then allow what the tests try, so only the sandbox can deny it.
fn open_dir(mode: u32, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    let file = dir.path().join("file.txt");
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    (dir, file)
}

/// Asserts that `outcome` is an error whose text holds `denied` and returns the text.
fn denied(outcome: &ToolOutcome, denied: &str) -> String {
    let message = err(outcome);
    assert!(message.contains(denied), "expected {denied:?} in: {message}");
    message.to_string()
}

/// Calls `other.echo`, to show that a hostile plugin did not take the registry down with it.
async fn others_carry_on(registry: &PluginRegistry) {
    assert_eq!(ok(&registry.call("other.echo", json!({"text": "still here"})).await), "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_outside_the_read_paths_is_denied() {
    let marker = marker("read");
    let (inside, inside_file) = open_dir(0o755, "readable by the plugin");
    let (_outside, outside_file) = open_dir(0o755, "not for the plugin");
    let plugins = Plugins::new();
    plugins.write("t.toml", &manifest_reading(&["--tools=echo,read", &marker], &[inside.path()], ""));
    plugins.write("other.toml", &manifest(&["--tools=echo", &marker], ""));
    let registry = plugins.start().await;

    // Secrets: /etc/shadow is also closed to the plugin's uid, /etc/passwd is world-readable but
    // outside what the sandbox grants of /etc, like the temporary file.
    for path in ["/etc/shadow", "/etc/passwd", outside_file.to_str().unwrap()] {
        if !Path::new(path).exists() {
            phi3d_tests::skip(format!("reading {path}: this machine has no such file"));
            continue;
        }
        let message = denied(&registry.call("t.read", json!({"path": path})).await, "Permission denied (EACCES)");
        assert!(message.starts_with(&format!("cannot read {path}:")), "{message}");
        assert!(!message.contains("not for the plugin") && !message.contains("root:"), "{message}");
    }
    // The positive control: a file in a `read` path.
    assert_eq!(ok(&registry.call("t.read", json!({"path": inside_file})).await), "readable by the plugin");

    assert_eq!(ok(&registry.call("t.echo", json!({"text": "alive"})).await), "alive");
    others_carry_on(&registry).await;
    registry.shutdown().await;
    wait_until_no_process(&marker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_outside_the_write_paths_is_denied() {
    let marker = marker("write");
    // World-writable, since the plugin runs as a uid of its own when the tests run as root.
    let (writable, _) = open_dir(0o777, "");
    let (elsewhere, elsewhere_file) = open_dir(0o777, "untouched");
    let write = format!("write = [{:?}]\n", writable.path().display().to_string());
    let plugins = Plugins::new();
    plugins.write("t.toml", &manifest(&["--tools=echo,write", &marker], &format!("{write}max_file_size_mb = 1")));
    // The strict default max_file_size_mb = 0: a write path alone does not let it write a byte.
    plugins.write("nofiles.toml", &manifest(&["--tools=write", &marker], &write));
    plugins.write("other.toml", &manifest(&["--tools=echo", &marker], ""));
    let registry = plugins.start().await;

    // A new file and an existing one outside the write paths, and a read-only system tree.
    let new_file = elsewhere.path().join("new.txt");
    for path in [new_file.as_path(), elsewhere_file.as_path(), Path::new("/usr/phi3d-plugin-test.txt")] {
        let outcome = registry.call("t.write", json!({"path": path, "text": "overwritten"})).await;
        let message = denied(&outcome, "Permission denied (EACCES)");
        assert!(message.starts_with(&format!("cannot write {}:", path.display())), "{message}");
    }
    assert!(!new_file.exists() && !Path::new("/usr/phi3d-plugin-test.txt").exists());
    assert_eq!(std::fs::read_to_string(&elsewhere_file).unwrap(), "untouched");

    // The positive control: a file in a `write` path.
    let written = writable.path().join("out.txt");
    let outcome = registry.call("t.write", json!({"path": written, "text": "from the plugin"})).await;
    assert_eq!(ok(&outcome), format!("wrote {}", written.display()));
    assert_eq!(std::fs::read_to_string(&written).unwrap(), "from the plugin");
    if KernelSupport::probe().running_as_root {
        assert_eq!(std::fs::metadata(&written).unwrap().uid(), registry.plugin_uid("t"), "the plugin ran as its own uid");
    }

    let too_big = writable.path().join("too-big.txt");
    denied(&registry.call("nofiles.write", json!({"path": too_big, "text": "x"})).await, "File too large (EFBIG)");
    assert_eq!(std::fs::metadata(&too_big).map(|m| m.len()).unwrap_or(0), 0);

    assert_eq!(ok(&registry.call("t.echo", json!({"text": "alive"})).await), "alive");
    others_carry_on(&registry).await;
    registry.shutdown().await;
    wait_until_no_process(&marker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_beyond_the_network_permission_is_denied() {
    let support = KernelSupport::probe();
    let marker = marker("connect");
    // A listener the plugin would reach if nothing stopped it, and another port to allow instead.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let other_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other_listener.local_addr().unwrap().port();

    let plugins = Plugins::new();
    plugins.write("t.toml", &manifest(&["--tools=echo,connect", &marker], ""));
    let network = |port: u16| format!("network = [\"127.0.0.1:{port}\"]");
    plugins.write("elsewhere.toml", &manifest(&["--tools=connect", &marker], &network(other_port)));
    plugins.write("allowed.toml", &manifest(&["--tools=connect", &marker], &network(port)));
    plugins.write("other.toml", &manifest(&["--tools=echo", &marker], ""));
    let registry = plugins.start().await;
    let connect = |plugin: &str| {
        let (registry, tool) = (registry.clone(), format!("{plugin}.connect"));
        async move { registry.call(&tool, json!({"port": port})).await }
    };

    // network = "none" (the default): a network namespace of its own, and AF_UNIX sockets only.
    let landlock_tcp = support.landlock_abi.is_some_and(|abi| abi >= 4);
    if support.seccomp {
        denied(&connect("t").await, "Operation not permitted (EPERM)");
    } else if support.network_namespaces {
        denied(&connect("t").await, "Network is unreachable (ENETUNREACH)");
    } else {
        phi3d_tests::skip("network \"none\": this kernel has neither seccomp filters nor network namespaces");
    }

    // A list of host:port: the host's network, with Landlock allowing TCP connects to its ports.
    if landlock_tcp {
        let message = denied(&connect("elsewhere").await, "Permission denied (EACCES)");
        assert!(message.starts_with(&format!("cannot connect to 127.0.0.1:{port}:")), "{message}");
    } else {
        phi3d_tests::skip(format!(
            "TCP port filtering: it needs Landlock ABI 4, and this kernel has {:?}",
            support.landlock_abi
        ));
    }
    // Nothing got through to the listener.
    assert_eq!(listener.accept().err().map(|e| e.kind()), Some(std::io::ErrorKind::WouldBlock));

    // The positive control: the listed port.
    if landlock_tcp {
        assert_eq!(ok(&connect("allowed").await), format!("connected to 127.0.0.1:{port}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(error) = listener.accept() {
            assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock);
            assert!(Instant::now() < deadline, "the plugin said it connected, but the listener saw nothing");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        phi3d_tests::skip("connecting to an allowed port: without Landlock ABI 4 the denied case cannot be told apart");
    }

    assert_eq!(ok(&registry.call("t.echo", json!({"text": "alive"})).await), "alive");
    others_carry_on(&registry).await;
    registry.shutdown().await;
    wait_until_no_process(&marker).await;
}

#[tokio::test]
async fn a_reload_moves_the_registry_to_another_folder_and_watches_that_one() {
    let (first, registry) = one_plugin(&[], "").await;
    eventually(&registry, "the first folder's plugin", |tools| tools.iter().any(|t| t.plugin == "t")).await;
    let second = Plugins::new();
    second.write("u.toml", &manifest(&[], ""));
    registry.reload(second.dir.path().to_path_buf(), Requirement::BestEffort).await.unwrap();
    let only_u = |tools: &[ToolInfo]| !tools.is_empty() && tools.iter().all(|t| t.plugin == "u");
    eventually(&registry, "the second folder's plugin alone", only_u).await;
    // The new folder is watched, the old one no longer.
    first.write("v.toml", &manifest(&[], ""));
    second.write("w.toml", &manifest(&[], ""));
    eventually(&registry, "a plugin added to the watched folder", |tools| tools.iter().any(|t| t.plugin == "w")).await;
    assert!(registry.tools().await.iter().all(|t| t.plugin != "v"), "the old folder is still followed");
    // A new sandbox requirement replaces every plugin; they keep answering.
    registry.reload(second.dir.path().to_path_buf(), Requirement::Strict).await.unwrap();
    assert_eq!(ok(&registry.call("u.echo", json!({"text": "still here"})).await), "still here");
    registry.shutdown().await;
}
