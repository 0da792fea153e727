//! A real Kubernetes API server for tests: etcd and kube-apiserver (the binaries kept in
//! `../shared/k8s` beside the workspace, or `$KUBE_TEST_BIN_DIR`) started on loopback with a
//! fresh data directory, a self-signed CA, token authentication and RBAC; stopped and removed on
//! drop. There is no controller manager, scheduler or kubelet: tests create EndpointSlices
//! themselves, and `kube-system` exists because [`ApiServer::start`] creates it.
//!
//! A test that cannot find the binaries, or cannot start them, panics: it never skips.
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The admin's bearer token (group `system:masters`) in the kubeconfig [`ApiServer::kubeconfig`].
const ADMIN_TOKEN: &str = "testenv-admin-token";

/// A running etcd + kube-apiserver pair.
pub struct ApiServer {
    dir: tempfile::TempDir,
    etcd: Child,
    apiserver: Child,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
}

/// Where the binaries are: `$KUBE_TEST_BIN_DIR`, else `../shared/k8s` from the workspace root.
///
/// # Panics
/// Neither holds `etcd` and `kube-apiserver`.
pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("KUBE_TEST_BIN_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/k8s"),
        PathBuf::from,
    );
    for bin in ["etcd", "kube-apiserver"] {
        assert!(
            dir.join(bin).is_file(),
            "{} not found: the real API server tests need ../shared/k8s (or KUBE_TEST_BIN_DIR)",
            dir.join(bin).display()
        );
    }
    dir
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl (package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("create a log file");
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()))
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers `ok` (about 10 s).
    ///
    /// # Panics
    /// The binaries are missing or the server does not become ready within 60 s.
    pub fn start() -> ApiServer {
        let bins = bin_dir();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=testenv-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        );
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write san.ext");
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.ext",
                "-out",
                "server.crt",
            ],
        );
        openssl(d, &["genrsa", "-out", "sa.key", "2048"]);
        openssl(d, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        std::fs::write(
            d.join("tokens.csv"),
            format!("{ADMIN_TOKEN},testenv-admin,1,\"system:masters\"\n"),
        )
        .expect("write tokens.csv");

        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let url = |p: u16| format!("http://127.0.0.1:{p}");
        let etcd_args: Vec<String> = [
            "--name",
            "testenv",
            "--data-dir",
            &d.join("etcd").display().to_string(),
            "--listen-client-urls",
            &url(client),
            "--advertise-client-urls",
            &url(client),
            "--listen-peer-urls",
            &url(peer),
            "--initial-advertise-peer-urls",
            &url(peer),
            "--initial-cluster",
            &format!("testenv={}", url(peer)),
            "--unsafe-no-fsync",
        ]
        .map(str::to_owned)
        .to_vec();
        let etcd = spawn(&bins.join("etcd"), &etcd_args, &d.join("etcd.log"));
        let file = |n: &str| d.join(n).display().to_string();
        let api_args: Vec<String> = [
            "--etcd-servers",
            &url(client),
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            &secure.to_string(),
            "--endpoint-reconciler-type",
            "none",
            "--tls-cert-file",
            &file("server.crt"),
            "--tls-private-key-file",
            &file("server.key"),
            "--client-ca-file",
            &file("ca.crt"),
            "--token-auth-file",
            &file("tokens.csv"),
            "--authorization-mode",
            "RBAC",
            "--anonymous-auth=false",
            "--service-cluster-ip-range",
            "10.96.0.0/12",
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file",
            &file("sa.pub"),
            "--service-account-signing-key-file",
            &file("sa.key"),
            "--disable-admission-plugins",
            "ServiceAccount",
        ]
        .map(str::to_owned)
        .to_vec();
        let apiserver = spawn(
            &bins.join("kube-apiserver"),
            &api_args,
            &d.join("apiserver.log"),
        );
        let server = ApiServer {
            url: format!("https://127.0.0.1:{secure}"),
            dir,
            etcd,
            apiserver,
        };
        server.write_kubeconfig();
        server.wait_ready();
        let ns = server.kubectl(&["create", "namespace", "kube-system"]);
        assert!(
            ns.status.success() || String::from_utf8_lossy(&ns.stderr).contains("AlreadyExists"),
            "create kube-system: {}",
            String::from_utf8_lossy(&ns.stderr)
        );
        server
    }

    /// A kubeconfig for the admin (token auth, the server's CA).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn write_kubeconfig(&self) {
        let ca = self.dir.path().join("ca.crt");
        std::fs::write(
            self.kubeconfig(),
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: testenv, cluster: {{server: \"{}\", certificate-authority: \"{}\"}}}}]\n\
                 users: [{{name: admin, user: {{token: {ADMIN_TOKEN}}}}}]\n\
                 contexts: [{{name: testenv, context: {{cluster: testenv, user: admin}}}}]\n\
                 current-context: testenv\n",
                self.url,
                ca.display()
            ),
        )
        .expect("write the kubeconfig");
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz"]);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return;
            }
            let log =
                std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready within 60 s; its log ends:\n{}",
                log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `kubectl --kubeconfig <admin> ARGS`.
    ///
    /// # Panics
    /// kubectl cannot be started (package kubectl).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .expect("run kubectl (package kubectl)")
    }

    /// `kubectl ARGS` that must succeed; its standard output.
    ///
    /// # Panics
    /// kubectl failed.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
