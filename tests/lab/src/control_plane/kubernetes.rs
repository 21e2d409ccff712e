//! The real Kubernetes control plane of `veilnet lab up --control-plane kubernetes`: etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler, built by
//! `scripts/build-kubernetes.sh` from the release that `tests/kubernetes/go.mod` pins, all in the
//! lab's control-plane namespace.
//!
//! - etcd listens on the namespace's loopback only (nothing on the underlay reaches it).
//! - kube-apiserver serves TLS on the control plane's underlay address, port 6443, with client
//!   certificates from the lab's CA ([`super::pki`]), ServiceAccount tokens signed by the lab's
//!   key, `--authorization-mode=Node,RBAC` and the `NodeRestriction` admission plugin.
//! - kube-controller-manager runs node IPAM (`--allocate-node-cidrs` with the lab's cluster CIDR,
//!   for `--pod-cidrs assigned`; [`service_cidr`] says why node-N gets subnet N) and the namespace, garbage-collector, ServiceAccount, token,
//!   root-CA publisher, DaemonSet and node lifecycle controllers, each with its own
//!   ServiceAccount's credentials.
//! - kube-scheduler binds pods created without `spec.nodeName`.
//!
//! Each component has a kubeconfig of its own identity; the lab kubelets get
//! `system:node:<name>` (group `system:nodes`) client certificates, and the veilnet agents a
//! TokenRequest token of the manifest's `veilnet` ServiceAccount, after the lab applied the
//! manifest's namespace, ServiceAccount and RBAC objects with kubectl.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use ipnet::Ipv4Net;

use super::pki::{ClientIdentity, Pki, PkiError};
use crate::daemon::{Daemon, DaemonError};
use crate::layout::{LabLayout, NodeLayout, PodCidrMode};
use veilnet::netns::{self, NetnsError};

/// `tests/kubernetes/go.mod`: the one place the pinned release is written.
const GO_MOD: &str = include_str!("../../../kubernetes/go.mod");
/// The install manifest, whose namespace, ServiceAccount and RBAC objects the lab applies.
const MANIFEST: &str = include_str!("../../../../manifests/veilnet.yaml");
/// Kinds of the manifest applied to a lab (the DaemonSets and ConfigMap are what the lab itself
/// runs as processes).
const APPLIED_KINDS: &[&str] = &[
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];
/// Overrides where the binaries are looked for (default: `target/kubernetes/<version>/bin`).
pub const BIN_DIR_ENV: &str = "VEILNET_KUBERNETES_BIN";
/// The Service CIDR when the agents allocate pod CIDRs (`--pod-cidrs agent`).
pub const AGENT_MODE_SERVICE_CIDR: &str = "10.96.0.0/16";
/// Issuer of the lab's ServiceAccount tokens.
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The agents' token lifetime: as long as a lab is expected to live.
const AGENT_TOKEN_SECONDS: i64 = 7 * 24 * 3600;
const ETCD_CLIENT_URL: &str = "http://127.0.0.1:2379";
const ETCD_PEER_URL: &str = "http://127.0.0.1:2380";

/// kube-controller-manager's controllers (1.34 names).
const CONTROLLERS: &[&str] = &[
    "namespace-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "daemonset-controller",
    // Takes the `node.kubernetes.io/not-ready` taint (which the apiserver's admission puts on
    // every new Node) off Ready nodes, so the scheduler places pods; and marks nodes whose Lease
    // stops Unknown. Evictions are another controller's (taint-eviction), which the lab does not
    // run: a lab node whose kubelet restarts keeps its pods.
    "node-lifecycle-controller",
];
const NODE_IPAM_CONTROLLER: &str = "node-ipam-controller";

/// The binaries, by the role the lab gives each daemon.
pub const COMPONENTS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("Kubernetes {version} is not built ({missing} missing in {dir}): run scripts/build-kubernetes.sh (about 11 minutes on 2 cores the first time)")]
    NotBuilt {
        version: String,
        missing: String,
        dir: PathBuf,
    },
    #[error("the lab's cluster CIDR {0} overlaps the Service CIDR {AGENT_MODE_SERVICE_CIDR}")]
    CidrOverlap(Ipv4Net),
    #[error("the cluster CIDR {cluster} has too few /{prefix} subnets for {nodes} nodes and the Service range")]
    TooFewSubnets {
        cluster: Ipv4Net,
        prefix: u8,
        nodes: usize,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("failed to write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kubectl {what} failed: {detail}")]
    Kubectl { what: String, detail: String },
    #[error("the install manifest does not parse: {0}")]
    Manifest(String),
}

pub type Result<T> = std::result::Result<T, KubernetesError>;

/// The Kubernetes release `tests/kubernetes/go.mod` pins, e.g. `v1.34.4`.
pub fn pinned_version() -> &'static str {
    GO_MOD
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("k8s.io/kubernetes"))
                .then(|| words.next())
                .flatten()
        })
        .unwrap_or("unknown")
}

/// The directory with the built binaries: `$VEILNET_KUBERNETES_BIN`, else
/// `target/kubernetes/<version>/bin` of the cargo target directory this binary was built in (or of
/// the source tree it was built from).
pub fn bin_dir() -> Result<PathBuf> {
    let version = pinned_version();
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(dir));
    } else {
        let sub = Path::new("kubernetes").join(version).join("bin");
        if let Ok(exe) = std::env::current_exe() {
            candidates.extend(exe.ancestors().skip(1).map(|a| a.join(&sub)));
        }
        candidates.push(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target")
                .join(&sub),
        );
    }
    let complete = |dir: &Path| {
        COMPONENTS
            .iter()
            .chain(&["kubectl"])
            .find(|b| !dir.join(b).is_file())
            .map(|b| b.to_string())
    };
    for dir in &candidates {
        if complete(dir).is_none() {
            return Ok(dir.clone());
        }
    }
    let dir = candidates.last().cloned().unwrap_or_default();
    Err(KubernetesError::NotBuilt {
        version: version.into(),
        missing: complete(&dir).unwrap_or_default(),
        dir,
    })
}

/// The Service CIDR (apiserver and controller-manager `--service-cluster-ip-range`).
///
/// With `--pod-cidrs assigned` it is the cluster CIDR's first node-sized subnet: node IPAM leaves
/// a Service range inside the cluster CIDR out, so `node-N` gets subnet N, the same CIDR the
/// stand-in pre-assigns (`LabLayout::assigned_pod_cidr`). Nothing in the lab uses Service IPs
/// (there is no kube-proxy); only the `kubernetes` Service gets the range's first address.
pub fn service_cidr(lab: &LabLayout) -> Result<Ipv4Net> {
    match lab.spec.pod_cidrs {
        PodCidrMode::Assigned => {
            let last = lab.assigned_pod_cidr(lab.spec.nodes);
            match (lab.assigned_pod_cidr(0), last) {
                (Some(first), Some(_)) => Ok(first),
                _ => Err(KubernetesError::TooFewSubnets {
                    cluster: lab.spec.cluster_cidr,
                    prefix: lab.spec.node_cidr_prefix,
                    nodes: lab.spec.nodes,
                }),
            }
        }
        PodCidrMode::Agent => {
            let service: Ipv4Net = AGENT_MODE_SERVICE_CIDR.parse().expect("static CIDR");
            let cluster = lab.spec.cluster_cidr;
            if service.contains(&cluster.network()) || cluster.contains(&service.network()) {
                return Err(KubernetesError::CidrOverlap(cluster));
            }
            Ok(service)
        }
    }
}

/// The `kubernetes` Service's address: the Service CIDR's first.
fn service_ip(cidr: Ipv4Net) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

/// The lab's PKI.
pub fn pki(lab: &LabLayout) -> Pki {
    Pki::new(lab.control_plane_dir().join("pki"))
}

fn admin_identity() -> ClientIdentity {
    ClientIdentity::new("admin", "veilnet-lab-admin", &["system:masters"])
}

fn controller_manager_identity() -> ClientIdentity {
    ClientIdentity::new(
        "kube-controller-manager",
        "system:kube-controller-manager",
        &[],
    )
}

fn scheduler_identity() -> ClientIdentity {
    ClientIdentity::new("kube-scheduler", "system:kube-scheduler", &[])
}

/// A lab kubelet's identity, as the Node authorizer and NodeRestriction expect it.
pub fn node_identity(node: &NodeLayout) -> ClientIdentity {
    ClientIdentity::new(
        &node.name,
        &format!("system:node:{}", node.name),
        &["system:nodes"],
    )
}

fn component_kubeconfig(lab: &LabLayout, component: &str) -> PathBuf {
    lab.control_plane_dir()
        .join(format!("{component}.kubeconfig"))
}

fn b64_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| KubernetesError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// A kubeconfig for the lab's apiserver with `user` (credentials inline, so the file stands alone).
fn kubeconfig_json(
    lab: &LabLayout,
    user_name: &str,
    user: serde_json::Value,
) -> Result<serde_json::Value> {
    let name = lab.name();
    Ok(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {
            "server": lab.api_url(),
            "certificate-authority-data": b64_file(&pki(lab).ca_cert())?,
        }}],
        "users": [{"name": user_name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user_name, "namespace": "default"}}],
        "current-context": name,
    }))
}

fn cert_kubeconfig(lab: &LabLayout, id: &ClientIdentity) -> Result<serde_json::Value> {
    let pki = pki(lab);
    kubeconfig_json(
        lab,
        &id.user,
        serde_json::json!({
            "client-certificate-data": b64_file(&pki.client_cert(id))?,
            "client-key-data": b64_file(&pki.client_key(id))?,
        }),
    )
}

/// A kubeconfig that authenticates with a bearer token.
pub fn token_kubeconfig(lab: &LabLayout, user: &str, token: &str) -> Result<serde_json::Value> {
    kubeconfig_json(lab, user, serde_json::json!({ "token": token }))
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    veilnet::fsutil::write_atomic(path, &bytes).map_err(|source| KubernetesError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Makes the PKI and every certificate-based kubeconfig: the lab's (admin), the controller
/// manager's, the scheduler's and each kubelet's. Idempotent.
pub fn prepare(lab: &LabLayout) -> Result<()> {
    let service = service_cidr(lab)?;
    let sans = vec![
        format!("IP:{}", lab.control_plane_ip()),
        "IP:127.0.0.1".into(),
        format!("IP:{}", service_ip(service)),
        "DNS:localhost".into(),
        "DNS:kubernetes".into(),
        "DNS:kubernetes.default".into(),
        "DNS:kubernetes.default.svc".into(),
        "DNS:kubernetes.default.svc.cluster.local".into(),
    ];
    let mut clients = vec![
        admin_identity(),
        controller_manager_identity(),
        scheduler_identity(),
    ];
    clients.extend(lab.nodes().iter().map(node_identity));
    let pki = pki(lab);
    pki.ensure(lab.name(), &sans, &clients)?;
    write_json(&lab.kubeconfig(), &cert_kubeconfig(lab, &admin_identity())?)?;
    write_json(
        &component_kubeconfig(lab, "kube-controller-manager"),
        &cert_kubeconfig(lab, &controller_manager_identity())?,
    )?;
    write_json(
        &component_kubeconfig(lab, "kube-scheduler"),
        &cert_kubeconfig(lab, &scheduler_identity())?,
    )?;
    for node in lab.nodes() {
        std::fs::create_dir_all(&node.dir).map_err(|source| KubernetesError::Io {
            path: node.dir.clone(),
            source,
        })?;
        write_json(
            &node.kubelet_kubeconfig(),
            &cert_kubeconfig(lab, &node_identity(&node))?,
        )?;
    }
    Ok(())
}

fn p(path: PathBuf) -> String {
    path.display().to_string()
}

fn etcd_args(lab: &LabLayout) -> Vec<String> {
    let data = lab.control_plane_dir().join("etcd");
    vec![
        "--name".into(),
        "lab".into(),
        format!("--data-dir={}", p(data)),
        format!("--listen-client-urls={ETCD_CLIENT_URL}"),
        format!("--advertise-client-urls={ETCD_CLIENT_URL}"),
        format!("--listen-peer-urls={ETCD_PEER_URL}"),
        format!("--initial-advertise-peer-urls={ETCD_PEER_URL}"),
        format!("--initial-cluster=lab={ETCD_PEER_URL}"),
        // A lab's data is thrown away with it: no fsync, which on a shared disk would make every
        // write wait for everyone else's I/O.
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ]
}

fn apiserver_args(lab: &LabLayout) -> Result<Vec<String>> {
    let pki = pki(lab);
    Ok(vec![
        format!("--advertise-address={}", lab.control_plane_ip()),
        "--bind-address=0.0.0.0".into(),
        format!("--secure-port={}", lab.api_addr().port()),
        format!("--etcd-servers={ETCD_CLIENT_URL}"),
        format!("--client-ca-file={}", p(pki.ca_cert())),
        format!("--tls-cert-file={}", p(pki.serving_cert())),
        format!("--tls-private-key-file={}", p(pki.serving_key())),
        format!("--service-account-issuer={SA_ISSUER}"),
        format!("--service-account-key-file={}", p(pki.sa_pub())),
        format!("--service-account-signing-key-file={}", p(pki.sa_key())),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        format!("--service-cluster-ip-range={}", service_cidr(lab)?),
        "--allow-privileged=true".into(),
        format!(
            "--cert-dir={}",
            p(lab.control_plane_dir().join("apiserver-certs"))
        ),
        "--profiling=false".into(),
        "--event-ttl=1h".into(),
        // As kubeadm sets it: the node proxy (`veilnet observe`) dials a node's InternalIP, not
        // its hostname, which nothing in the lab resolves.
        "--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname".into(),
        // The front-proxy (request-header) settings kubeadm gives every cluster. Without them
        // the extension-apiserver-authentication ConfigMap has no request-header CA, and
        // kube-controller-manager and kube-scheduler log an error about it every few seconds.
        // Only a certificate named front-proxy-client may assert identities in headers, and the
        // lab issues none.
        format!("--requestheader-client-ca-file={}", p(pki.ca_cert())),
        "--requestheader-allowed-names=front-proxy-client".into(),
        "--requestheader-username-headers=X-Remote-User".into(),
        "--requestheader-group-headers=X-Remote-Group".into(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
    ])
}

fn controller_manager_args(lab: &LabLayout) -> Result<Vec<String>> {
    let pki = pki(lab);
    let kubeconfig = p(component_kubeconfig(lab, "kube-controller-manager"));
    let mut controllers = CONTROLLERS.to_vec();
    let assigned = lab.spec.pod_cidrs == PodCidrMode::Assigned;
    if assigned {
        controllers.push(NODE_IPAM_CONTROLLER);
    }
    let mut args = vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".into(),
        format!(
            "--cert-dir={}",
            p(lab.control_plane_dir().join("kcm-certs"))
        ),
        "--leader-elect=false".into(),
        format!("--controllers={}", controllers.join(",")),
        "--use-service-account-credentials=true".into(),
        format!("--service-account-private-key-file={}", p(pki.sa_key())),
        format!("--root-ca-file={}", p(pki.ca_cert())),
        format!("--service-cluster-ip-range={}", service_cidr(lab)?),
        format!("--allocate-node-cidrs={assigned}"),
    ];
    if assigned {
        args.push(format!("--cluster-cidr={}", lab.spec.cluster_cidr));
        args.push(format!(
            "--node-cidr-mask-size={}",
            lab.spec.node_cidr_prefix
        ));
    }
    Ok(args)
}

fn scheduler_args(lab: &LabLayout) -> Vec<String> {
    let kubeconfig = p(component_kubeconfig(lab, "kube-scheduler"));
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=false".into(),
    ]
}

/// Starts etcd and kube-apiserver (whichever is not running). The caller waits for `/readyz`.
pub fn start_apiserver(lab: &LabLayout, pid_dir: &Path, log_dir: &Path) -> Result<()> {
    let bin = bin_dir()?;
    for (role, args) in [
        ("etcd", etcd_args(lab)),
        ("kube-apiserver", apiserver_args(lab)?),
    ] {
        start(lab, &bin, role, args, pid_dir, log_dir)?;
    }
    Ok(())
}

/// Starts kube-controller-manager and kube-scheduler (whichever is not running).
pub fn start_controllers(lab: &LabLayout, pid_dir: &Path, log_dir: &Path) -> Result<()> {
    let bin = bin_dir()?;
    for (role, args) in [
        ("kube-controller-manager", controller_manager_args(lab)?),
        ("kube-scheduler", scheduler_args(lab)),
    ] {
        start(lab, &bin, role, args, pid_dir, log_dir)?;
    }
    Ok(())
}

fn start(
    lab: &LabLayout,
    bin: &Path,
    role: &str,
    args: Vec<String>,
    pid_dir: &Path,
    log_dir: &Path,
) -> Result<()> {
    Daemon {
        role: role.into(),
        program: bin.join(role),
        netns: lab.control_plane_netns(),
        args,
        pid_dir,
        log_dir,
    }
    .ensure_started_foreign()?;
    Ok(())
}

/// The built kubectl, run in the control plane's namespace with the lab's admin kubeconfig.
pub fn kubectl(lab: &LabLayout) -> Result<Command> {
    let mut cmd = Command::new(bin_dir()?.join("kubectl"));
    cmd.env("KUBECONFIG", lab.kubeconfig())
        .env("KUBECACHEDIR", lab.root().join("kubectl-cache"));
    netns::command_in(&lab.control_plane_netns(), &mut cmd)?;
    Ok(cmd)
}

/// The manifest's namespace, ServiceAccount and RBAC objects, as one `kind: List`.
pub fn manifest_rbac_list() -> Result<serde_json::Value> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(MANIFEST)
        .map_err(|e| KubernetesError::Manifest(e.to_string()))?;
    let items: Vec<serde_json::Value> = docs
        .into_iter()
        .filter(|d| {
            d["kind"]
                .as_str()
                .is_some_and(|k| APPLIED_KINDS.contains(&k))
        })
        .collect();
    Ok(serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}))
}

/// `kubectl apply` of the manifest's namespace, ServiceAccount and RBAC objects, as an operator's
/// `kubectl apply -f manifests/veilnet.yaml` would create them.
pub fn apply_manifest_rbac(lab: &LabLayout) -> Result<()> {
    let list = serde_json::to_vec(&manifest_rbac_list()?).expect("JSON values serialize");
    let mut cmd = kubectl(lab)?;
    cmd.args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let fail = |detail: String| KubernetesError::Kubectl {
        what: "apply (the manifest's RBAC)".into(),
        detail,
    };
    let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&list).map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Writes each node's agent kubeconfig with its own TokenRequest token of the ServiceAccount
/// `namespace/sa` (kept when present: a restarted lab keeps its agents' identity).
pub fn write_agent_kubeconfigs(lab: &LabLayout, namespace: &str, sa: &str) -> Result<()> {
    for node in lab.nodes() {
        if node.agent_kubeconfig().exists() {
            continue;
        }
        let out = kubectl(lab)?
            .args([
                "create",
                "token",
                sa,
                "-n",
                namespace,
                &format!("--duration={AGENT_TOKEN_SECONDS}s"),
            ])
            .output()
            .map_err(|e| KubernetesError::Kubectl {
                what: "create token".into(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(KubernetesError::Kubectl {
                what: format!("create token {namespace}/{sa}"),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let user = format!("system:serviceaccount:{namespace}:{sa}");
        write_json(
            &node.agent_kubeconfig(),
            &token_kubeconfig(lab, &user, &token)?,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_version_is_read_from_go_mod() {
        let v = pinned_version();
        assert!(v.starts_with("v1."), "{v}");
        assert_eq!(v.split('.').count(), 3, "{v}");
    }

    #[test]
    fn the_manifest_rbac_list_has_the_namespace_the_service_account_and_the_roles() {
        let list = manifest_rbac_list().unwrap();
        let kinds: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["kind"].as_str().unwrap())
            .collect();
        for k in [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
        ] {
            assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
        }
        assert!(!kinds.contains(&"DaemonSet"), "{kinds:?}");
    }
}
