//! A real browser: tests/browser/chat.test.mjs drives Debian's chromium (playwright-core, no
//! browser download) against this test's server, which serves the web client at `/`. Two
//! people sign in, find each other, chat live, and one catches up after being away. The
//! screenshot lands in test-artifacts/browser-chat.png.

use std::process::Command;

use crate::support::{repo_root, require_program, TestServer};

#[tokio::test]
async fn two_people_chat_in_chromium() {
    let node =
        require_program("node", &["/usr/bin/node", "/usr/local/bin/node"], "apt-get install -y nodejs npm");
    require_program("chromium", &["/usr/bin/chromium"], "apt-get install -y chromium");
    let tests = repo_root().join("tests/browser");
    assert!(
        tests.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed; scripts/test runs `npm ci` in tests/browser"
    );
    let server = TestServer::start().await;
    let screenshot = repo_root().join("test-artifacts/browser-chat.png");
    let url = format!("http://127.0.0.1:{}/", server.addr.port());
    let script = tests.join("chat.test.mjs");
    // The browser test is a child process; the server keeps running on this test's runtime.
    let output = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("180")
            .arg(node)
            .arg(script)
            .arg(&url)
            .arg(&screenshot)
            .output()
            .expect("run node")
    })
    .await
    .expect("browser test task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the browser test failed ({}):\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("Bob's conversation holds the whole history"), "{stdout}");
}
