//! Tests of `sys` with real processes (moved in from `tests/`, where they
//! could only reach `sys` while it was public), and the one helper the
//! crate's test modules share: [`in_own_process`].

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

mod spawn;

/// Names, in the process [`in_own_process`] starts, the one test it runs.
const OWN_PROCESS_VAR: &str = "SYNCLUSTER_TEST_OWN_PROCESS";
/// How long a test run on its own may take.
const OWN_PROCESS_DEADLINE: Duration = Duration::from_secs(60);

/// For a test that must not share its process with the others (it compares
/// `/proc/self/fd` before and after, or needs low fd numbers free): in a
/// normal run, runs test `name` of `module` (pass `module_path!()`) alone in
/// a new process of this test binary, panics unless it passed there, and
/// returns false; in that process, returns true: run the body.
pub(crate) fn in_own_process(module: &str, name: &str) -> bool {
    // Test names in the harness leave out the crate's own name.
    let module = module.split_once("::").map_or("", |(_, rest)| rest);
    let test = format!("{module}::{name}");
    if std::env::var_os(OWN_PROCESS_VAR).is_some_and(|v| v == test.as_str()) {
        return true;
    }
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", &test, "--test-threads=1", "--nocapture"])
        .env(OWN_PROCESS_VAR, &test)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read in threads, so that a chatty child never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > OWN_PROCESS_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    match status {
        None => panic!("{test} did not end within {OWN_PROCESS_DEADLINE:?}:\n{out}\n{err}"),
        // "1 passed": the filter found the test, and it ran.
        Some(s) => assert!(
            s.success() && out.contains("test result: ok. 1 passed"),
            "{test} in its own process: {s}\n{out}\n{err}"
        ),
    }
    false
}
