//! The CNI exec protocol as a container runtime drives it (libcni semantics, CNI spec 1.x).
//!
//! - Config loading: the lexically first `*.conf` / `*.conflist` / `*.json` of the conf dir, as
//!   containerd's go-cni picks it; a single-plugin `.conf` is wrapped into a one-plugin list.
//! - Per-plugin stdin ("Section 2: execution of network configurations"): the plugin's own object
//!   with `name` and `cniVersion` inserted from the list, `prevResult` (previous plugin's ADD result,
//!   or the cached result for CHECK/DEL) and `runtimeConfig` only for capabilities it declares.
//! - Chains: ADD in order, CHECK in order, DEL in reverse; the final ADD result is cached on disk
//!   (`<cache>/results/<network>-<container>-<ifname>`) with the config it was made with, so that DEL
//!   and CHECK work after a restart or a config change.
//! - STATUS and GC for lists of `cniVersion` >= 1.1.0.
//!
//! The pure parts (parsing, stdin/env construction, result and error parsing) are separate from the
//! I/O (`CniRuntime`), so they are unit-tested without plugins.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

/// Versions whose results this runtime understands.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Default per-plugin-call timeout.
pub const DEFAULT_PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Key of the valid-attachments list in a GC request.
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no network config found in {dir}")]
    NoConfig { dir: PathBuf },
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid network config {origin}: {reason}")]
    InvalidConfig { origin: String, reason: String },
    #[error("failed to find plugin {plugin:?} in path [{search_path}]")]
    PluginNotFound { plugin: String, search_path: String },
    #[error("plugin type={plugin:?} failed ({op}): {source}")]
    Plugin {
        plugin: String,
        op: &'static str,
        source: PluginCallError,
    },
    #[error("configuration version {version:?} does not support the {command} command")]
    Unsupported {
        version: String,
        command: &'static str,
    },
    #[error("failed to write CNI cache {path}: {source}")]
    CacheWrite {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why one plugin call failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginCallError {
    /// The plugin reported a CNI error object.
    #[error("{}", cni_error_text(.msg, .details))]
    Reported {
        code: u32,
        msg: String,
        details: String,
    },
    #[error("exited with {status} and no CNI error (stderr: {stderr:?})")]
    Exited { status: String, stderr: String },
    #[error("failed to start {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("I/O with the plugin failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("invalid result: {0}")]
    BadResult(String),
}

fn cni_error_text(msg: &str, details: &str) -> String {
    if details.is_empty() {
        msg.to_string()
    } else {
        format!("{msg}; {details}")
    }
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

/// `a.b.c` as a comparable tuple; anything unparsable sorts lowest.
pub fn version_tuple(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

fn version_at_least(v: &str, min: &str) -> bool {
    version_tuple(v) >= version_tuple(min)
}

/// One plugin of a list: its raw object (what goes to stdin, before injection).
#[derive(Clone, Debug, PartialEq)]
pub struct PluginConfig {
    pub plugin_type: String,
    pub raw: Map<String, Value>,
}

impl PluginConfig {
    /// Capabilities the plugin declares with `"capabilities": {"x": true}`.
    pub fn capabilities(&self) -> Vec<String> {
        self.raw
            .get("capabilities")
            .and_then(Value::as_object)
            .map(|caps| {
                caps.iter()
                    .filter(|(_, v)| v.as_bool() == Some(true))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A network configuration list, as libcni's `NetworkConfigList`.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfigList {
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    pub plugins: Vec<PluginConfig>,
    /// The list as JSON (a `.conf` is stored in its wrapped list form); cached with results.
    pub bytes: Vec<u8>,
    /// File it came from (for messages).
    pub origin: String,
}

impl NetworkConfigList {
    pub fn supports_status(&self) -> bool {
        version_at_least(&self.cni_version, "1.1.0")
    }
    pub fn supports_gc(&self) -> bool {
        self.supports_status() && !self.disable_gc
    }
}

fn invalid(origin: &str, reason: impl Into<String>) -> CniError {
    CniError::InvalidConfig {
        origin: origin.to_string(),
        reason: reason.into(),
    }
}

/// Picks the version of a list: `cniVersions` (1.1.0) names the versions it may be used with, and
/// the runtime takes the highest one it supports; otherwise `cniVersion`.
fn pick_version(obj: &Map<String, Value>, origin: &str) -> Result<String> {
    if let Some(versions) = obj.get("cniVersions").and_then(Value::as_array) {
        let best = versions
            .iter()
            .filter_map(Value::as_str)
            .filter(|v| SUPPORTED_VERSIONS.contains(v))
            .max_by_key(|v| version_tuple(v));
        if let Some(v) = best {
            return Ok(v.to_string());
        }
    }
    match obj.get("cniVersion").and_then(Value::as_str) {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => Err(invalid(origin, "no cniVersion")),
    }
}

/// Parses a `.conflist`.
pub fn parse_conflist(bytes: &[u8], origin: &str) -> Result<NetworkConfigList> {
    let obj: Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|e| invalid(origin, e.to_string()))?;
    let name = match obj.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => return Err(invalid(origin, "no name")),
    };
    let cni_version = pick_version(&obj, origin)?;
    let raw_plugins = obj
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(origin, "no 'plugins' key"))?;
    if raw_plugins.is_empty() {
        return Err(invalid(origin, "no plugins in list"));
    }
    let mut plugins = Vec::with_capacity(raw_plugins.len());
    for (i, p) in raw_plugins.iter().enumerate() {
        let raw = p
            .as_object()
            .ok_or_else(|| invalid(origin, format!("plugin {i} is not an object")))?;
        let plugin_type = match raw.get("type").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => t.to_string(),
            _ => return Err(invalid(origin, format!("plugin {i} has no type"))),
        };
        if plugin_type.contains('/') {
            return Err(invalid(
                origin,
                format!("plugin type {plugin_type:?} is a path"),
            ));
        }
        plugins.push(PluginConfig {
            plugin_type,
            raw: raw.clone(),
        });
    }
    let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
    Ok(NetworkConfigList {
        name,
        cni_version,
        disable_check: flag("disableCheck"),
        disable_gc: flag("disableGC"),
        plugins,
        bytes: bytes.to_vec(),
        origin: origin.to_string(),
    })
}

/// Parses a single-plugin `.conf`/`.json` and wraps it into a list (libcni `ConfListFromConf`).
pub fn parse_conf(bytes: &[u8], origin: &str) -> Result<NetworkConfigList> {
    let obj: Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|e| invalid(origin, e.to_string()))?;
    if obj.contains_key("plugins") {
        // go-cni loads such a file as a list too (a .conf holding a list is common in the wild).
        return parse_conflist(bytes, origin);
    }
    match obj.get("type").and_then(Value::as_str) {
        Some(t) if !t.is_empty() => {}
        _ => return Err(invalid(origin, "does not have a type")),
    }
    let name = obj.get("name").cloned().unwrap_or(Value::Null);
    let version = obj.get("cniVersion").cloned().unwrap_or(Value::Null);
    let list = serde_json::json!({"name": name, "cniVersion": version, "plugins": [obj]});
    let wrapped = serde_json::to_vec(&list).map_err(|e| invalid(origin, e.to_string()))?;
    parse_conflist(&wrapped, origin)
}

/// The file a runtime uses among `names`: the lexically first with a CNI config extension.
pub fn select_config_file<S: AsRef<str>>(names: &[S]) -> Option<String> {
    let mut candidates: Vec<&str> = names
        .iter()
        .map(AsRef::as_ref)
        .filter(|n| {
            Path::new(n)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "conf" | "conflist" | "json"))
        })
        .collect();
    candidates.sort_unstable();
    candidates.first().map(|s| s.to_string())
}

/// Loads the network config a runtime would use from `dir`.
pub fn load_default_config(dir: &Path) -> Result<NetworkConfigList> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CniError::NoConfig {
                dir: dir.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(CniError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| !t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let file = select_config_file(&names).ok_or_else(|| CniError::NoConfig {
        dir: dir.to_path_buf(),
    })?;
    let path = dir.join(&file);
    let bytes = std::fs::read(&path).map_err(|source| CniError::Read {
        path: path.clone(),
        source,
    })?;
    let origin = path.display().to_string();
    if file.ends_with(".conflist") {
        parse_conflist(&bytes, &origin)
    } else {
        parse_conf(&bytes, &origin)
    }
}

/// What the runtime knows about one attachment (libcni `RuntimeConf`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConf {
    pub container_id: String,
    /// Path of the network namespace (`/run/netns/<name>`).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` pairs, in order.
    pub args: Vec<(String, String)>,
    /// Values for capabilities (`portMappings`, `bandwidth`, ...); only declared ones are sent.
    pub capability_args: Map<String, Value>,
}

/// `CNI_ARGS` as containerd/CRI-O send it for a pod.
pub fn kubernetes_cni_args(
    namespace: &str,
    name: &str,
    sandbox_id: &str,
    uid: &str,
) -> Vec<(String, String)> {
    [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
        ("K8S_POD_UID", uid),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `K=V;K=V`.
pub fn format_cni_args(args: &[(String, String)]) -> String {
    args.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// The CNI commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Check,
    Del,
    Status,
    Gc,
}

impl Command {
    pub fn as_env(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Check => "CHECK",
            Command::Del => "DEL",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
    /// The word libcni uses in its error messages.
    fn op(self) -> &'static str {
        match self {
            Command::Add => "add",
            Command::Check => "check",
            Command::Del => "delete",
            Command::Status => "status",
            Command::Gc => "gc",
        }
    }
}

/// The stdin of one plugin call: the plugin object with `name`, `cniVersion`, `prevResult` and
/// `runtimeConfig` injected. `prev_result` is only sent from 0.4.0 on for CHECK/DEL (0.3.x plugins
/// got it for ADD only).
pub fn plugin_stdin(
    list: &NetworkConfigList,
    plugin: &PluginConfig,
    command: Command,
    prev_result: Option<&Value>,
    capability_args: &Map<String, Value>,
) -> Value {
    let mut obj = plugin.raw.clone();
    obj.insert("name".into(), Value::String(list.name.clone()));
    obj.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    let prev_allowed = match command {
        Command::Add => true,
        Command::Check | Command::Del => version_at_least(&list.cni_version, "0.4.0"),
        Command::Status | Command::Gc => false,
    };
    obj.remove("prevResult");
    if let (true, Some(prev)) = (prev_allowed, prev_result) {
        obj.insert("prevResult".into(), prev.clone());
    }
    if matches!(command, Command::Add | Command::Check | Command::Del) {
        let runtime_config: Map<String, Value> = plugin
            .capabilities()
            .into_iter()
            .filter_map(|cap| capability_args.get(&cap).map(|v| (cap, v.clone())))
            .collect();
        obj.remove("runtimeConfig");
        if !runtime_config.is_empty() {
            obj.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
    }
    Value::Object(obj)
}

/// The CNI_* environment of one call. STATUS and GC carry no attachment.
pub fn plugin_env(
    command: Command,
    rt: Option<&RuntimeConf>,
    cni_path: &str,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("CNI_COMMAND".to_string(), command.as_env().to_string()),
        ("CNI_PATH".to_string(), cni_path.to_string()),
    ];
    if let Some(rt) = rt {
        env.push(("CNI_CONTAINERID".into(), rt.container_id.clone()));
        env.push(("CNI_NETNS".into(), rt.netns.clone()));
        env.push(("CNI_IFNAME".into(), rt.ifname.clone()));
        env.push(("CNI_ARGS".into(), format_cni_args(&rt.args)));
    }
    env
}

/// One address of a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultIp {
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
}

/// A parsed ADD result (0.3.x, 0.4.0 and 1.x share the shape we need); `raw` is kept verbatim for
/// `prevResult` and the cache.
#[derive(Clone, Debug, PartialEq)]
pub struct CniResult {
    pub raw: Value,
    pub ips: Vec<ResultIp>,
}

impl CniResult {
    /// Addresses, IPv4 first (the order Kubernetes reports `podIPs` in).
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let mut v4: Vec<IpAddr> = self
            .ips
            .iter()
            .map(|i| i.address.addr())
            .filter(IpAddr::is_ipv4)
            .collect();
        v4.extend(
            self.ips
                .iter()
                .map(|i| i.address.addr())
                .filter(IpAddr::is_ipv6),
        );
        v4
    }
}

/// Parses a plugin's ADD output.
pub fn parse_result(bytes: &[u8]) -> Result<CniResult, PluginCallError> {
    let raw: Value =
        serde_json::from_slice(bytes).map_err(|e| PluginCallError::BadResult(e.to_string()))?;
    parse_result_value(raw)
}

pub fn parse_result_value(raw: Value) -> Result<CniResult, PluginCallError> {
    let obj = raw
        .as_object()
        .ok_or_else(|| PluginCallError::BadResult("not a JSON object".into()))?;
    if let Some(v) = obj.get("cniVersion").and_then(Value::as_str) {
        if !SUPPORTED_VERSIONS.contains(&v) {
            return Err(PluginCallError::BadResult(format!(
                "unsupported result version {v:?}"
            )));
        }
    }
    let mut ips = Vec::new();
    for ip in obj
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let address = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| PluginCallError::BadResult("ip without address".into()))?;
        let address: IpNet = address
            .parse()
            .map_err(|_| PluginCallError::BadResult(format!("bad address {address:?}")))?;
        let gateway = ip
            .get("gateway")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        ips.push(ResultIp { address, gateway });
    }
    Ok(CniResult { raw, ips })
}

/// Turns a failed call's stdout/stderr into an error: a CNI error object if the plugin wrote one.
pub fn parse_failure(status: &str, stdout: &[u8], stderr: &[u8]) -> PluginCallError {
    #[derive(Deserialize)]
    struct ErrorObject {
        code: Option<u32>,
        msg: Option<String>,
        #[serde(default)]
        details: String,
    }
    if let Ok(err) = serde_json::from_slice::<ErrorObject>(stdout) {
        if let Some(msg) = err.msg {
            return PluginCallError::Reported {
                code: err.code.unwrap_or(0),
                msg,
                details: err.details,
            };
        }
    }
    let stderr = String::from_utf8_lossy(stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(stdout).trim().to_string();
    PluginCallError::Exited {
        status: status.to_string(),
        stderr: if stderr.is_empty() { stdout } else { stderr },
    }
}

/// One entry of [`VALID_ATTACHMENTS_KEY`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The on-disk cache entry of one attachment (libcni's `cniCacheV1` shape, plus `netns`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedAttachment {
    pub kind: String,
    #[serde(rename = "containerId")]
    pub container_id: String,
    /// The config list, base64 (as libcni stores it).
    pub config: String,
    #[serde(rename = "ifName")]
    pub if_name: String,
    #[serde(rename = "networkName")]
    pub network_name: String,
    #[serde(rename = "cniArgs", default)]
    pub cni_args: Vec<(String, String)>,
    #[serde(rename = "capabilityArgs", default)]
    pub capability_args: Map<String, Value>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub netns: String,
}

impl CachedAttachment {
    /// The config list the attachment was made with.
    pub fn config_list(&self) -> Result<NetworkConfigList> {
        let origin = format!("cache of {}", self.container_id);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.config)
            .map_err(|e| invalid(&origin, e.to_string()))?;
        parse_conflist(&bytes, &origin)
    }
    pub fn runtime_conf(&self) -> RuntimeConf {
        RuntimeConf {
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            ifname: self.if_name.clone(),
            args: self.cni_args.clone(),
            capability_args: self.capability_args.clone(),
        }
    }
}

/// Executes plugins. Plugins inherit the caller's network namespace (they run in the node's).
#[derive(Clone, Debug)]
pub struct CniRuntime {
    pub bin_dirs: Vec<PathBuf>,
    /// libcni's `/var/lib/cni`; results go to `<cache_dir>/results`.
    pub cache_dir: PathBuf,
    pub timeout: Duration,
}

impl CniRuntime {
    pub fn new(bin_dirs: Vec<PathBuf>, cache_dir: PathBuf) -> Self {
        Self {
            bin_dirs,
            cache_dir,
            timeout: DEFAULT_PLUGIN_TIMEOUT,
        }
    }

    /// `CNI_PATH`.
    pub fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The first executable named `plugin` in the bin dirs.
    pub fn find_plugin(&self, plugin: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| {
                std::fs::metadata(p)
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
            .ok_or_else(|| CniError::PluginNotFound {
                plugin: plugin.to_string(),
                search_path: self.cni_path(),
            })
    }

    fn cache_path(&self, network: &str, container_id: &str, ifname: &str) -> PathBuf {
        self.cache_dir
            .join("results")
            .join(format!("{network}-{container_id}-{ifname}"))
    }

    /// Every cached attachment (for garbage collection after a crash).
    pub fn cached_attachments(&self) -> Vec<CachedAttachment> {
        let dir = self.cache_dir.join("results");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<CachedAttachment>(&b).ok())
            .collect()
    }

    pub fn cached(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Option<CachedAttachment> {
        let bytes = std::fs::read(self.cache_path(network, container_id, ifname)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write_cache(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
        result: &Value,
    ) -> Result<()> {
        let path = self.cache_path(&list.name, &rt.container_id, &rt.ifname);
        let entry = CachedAttachment {
            kind: "cniCacheV1".into(),
            container_id: rt.container_id.clone(),
            config: base64::engine::general_purpose::STANDARD.encode(&list.bytes),
            if_name: rt.ifname.clone(),
            network_name: list.name.clone(),
            cni_args: rt.args.clone(),
            capability_args: rt.capability_args.clone(),
            result: Some(result.clone()),
            netns: rt.netns.clone(),
        };
        let write = || -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            veilnet::fsutil::write_atomic(&path, &serde_json::to_vec(&entry)?)
        };
        write().map_err(|source| CniError::CacheWrite {
            path: path.clone(),
            source,
        })
    }

    fn remove_cache(&self, network: &str, rt: &RuntimeConf) {
        let _ = std::fs::remove_file(self.cache_path(network, &rt.container_id, &rt.ifname));
    }

    /// Runs one plugin: returns its stdout on success.
    async fn exec(
        &self,
        plugin: &PluginConfig,
        command: Command,
        env: &[(String, String)],
        stdin: &Value,
    ) -> Result<Vec<u8>> {
        let fail = |source| CniError::Plugin {
            plugin: plugin.plugin_type.clone(),
            op: command.op(),
            source,
        };
        let path = self.find_plugin(&plugin.plugin_type)?;
        let input = serde_json::to_vec(stdin)
            .map_err(|e| fail(PluginCallError::BadResult(e.to_string())))?;
        let mut cmd = tokio::process::Command::new(&path);
        // A stale CNI_* from our own environment must not reach the plugin.
        for (k, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
            if k.starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // A plugin binary just written (an install or upgrade racing us) can be "text file
        // busy" for a moment; libcni retries the same way.
        let mut attempts = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 5 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(source) => {
                    return Err(fail(PluginCallError::Spawn {
                        path: path.clone(),
                        source,
                    }))
                }
            }
        };
        let run = async {
            if let Some(mut stdin) = child.stdin.take() {
                // A plugin may exit without reading its config (e.g. on a usage error): its
                // output, not the broken pipe, says what went wrong.
                match stdin.write_all(&input).await {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
                    _ => drop(stdin),
                }
            }
            child.wait_with_output().await
        };
        let output = match tokio::time::timeout(self.timeout, run).await {
            Err(_) => return Err(fail(PluginCallError::Timeout(self.timeout))),
            Ok(Err(e)) => return Err(fail(PluginCallError::Io(e))),
            Ok(Ok(o)) => o,
        };
        if output.status.success() {
            Ok(output.stdout)
        } else {
            Err(fail(parse_failure(
                &output.status.to_string(),
                &output.stdout,
                &output.stderr,
            )))
        }
    }

    /// ADD the whole list; caches and returns the final result.
    pub async fn add_network_list(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<CniResult> {
        let env = plugin_env(Command::Add, Some(rt), &self.cni_path());
        let mut prev: Option<CniResult> = None;
        for plugin in &list.plugins {
            let stdin = plugin_stdin(
                list,
                plugin,
                Command::Add,
                prev.as_ref().map(|r| &r.raw),
                &rt.capability_args,
            );
            let out = self.exec(plugin, Command::Add, &env, &stdin).await?;
            let result = parse_result(&out).map_err(|source| CniError::Plugin {
                plugin: plugin.plugin_type.clone(),
                op: Command::Add.op(),
                source,
            })?;
            prev = Some(result);
        }
        let result = prev.ok_or_else(|| invalid(&list.origin, "no plugins in list"))?;
        self.write_cache(list, rt, &result.raw)?;
        Ok(result)
    }

    /// CHECK the list against the cached result.
    pub async fn check_network_list(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<()> {
        if !version_at_least(&list.cni_version, "0.4.0") {
            return Err(CniError::Unsupported {
                version: list.cni_version.clone(),
                command: "CHECK",
            });
        }
        if list.disable_check {
            return Ok(());
        }
        let cached = self
            .cached(&list.name, &rt.container_id, &rt.ifname)
            .and_then(|c| c.result);
        let Some(cached) = cached else {
            return Err(CniError::Plugin {
                plugin: list
                    .plugins
                    .first()
                    .map(|p| p.plugin_type.clone())
                    .unwrap_or_default(),
                op: Command::Check.op(),
                source: PluginCallError::BadResult("no cached result to check against".into()),
            });
        };
        let env = plugin_env(Command::Check, Some(rt), &self.cni_path());
        for plugin in &list.plugins {
            let stdin = plugin_stdin(
                list,
                plugin,
                Command::Check,
                Some(&cached),
                &rt.capability_args,
            );
            self.exec(plugin, Command::Check, &env, &stdin).await?;
        }
        Ok(())
    }

    /// DEL the list in reverse order with the cached result; removes the cache entry on success.
    /// Plugins must treat a missing attachment or namespace as success, so this is idempotent.
    pub async fn del_network_list(&self, list: &NetworkConfigList, rt: &RuntimeConf) -> Result<()> {
        let cached = self
            .cached(&list.name, &rt.container_id, &rt.ifname)
            .and_then(|c| c.result);
        let env = plugin_env(Command::Del, Some(rt), &self.cni_path());
        for plugin in list.plugins.iter().rev() {
            let stdin = plugin_stdin(
                list,
                plugin,
                Command::Del,
                cached.as_ref(),
                &rt.capability_args,
            );
            self.exec(plugin, Command::Del, &env, &stdin).await?;
        }
        self.remove_cache(&list.name, rt);
        Ok(())
    }

    /// STATUS (1.1.0): Ok when every plugin is ready; older lists are ready by definition.
    pub async fn status(&self, list: &NetworkConfigList) -> Result<()> {
        if !list.supports_status() {
            return Ok(());
        }
        let env = plugin_env(Command::Status, None, &self.cni_path());
        for plugin in &list.plugins {
            let stdin = plugin_stdin(list, plugin, Command::Status, None, &Map::new());
            self.exec(plugin, Command::Status, &env, &stdin).await?;
        }
        Ok(())
    }

    /// GC (1.1.0): tells every plugin which attachments are still valid.
    pub async fn gc(&self, list: &NetworkConfigList, valid: &[Attachment]) -> Result<()> {
        if !list.supports_gc() {
            return Ok(());
        }
        let env = plugin_env(Command::Gc, None, &self.cni_path());
        let valid = serde_json::to_value(valid).unwrap_or(Value::Array(Vec::new()));
        for plugin in &list.plugins {
            let mut stdin = plugin_stdin(list, plugin, Command::Gc, None, &Map::new());
            if let Some(obj) = stdin.as_object_mut() {
                obj.insert(VALID_ATTACHMENTS_KEY.into(), valid.clone());
            }
            self.exec(plugin, Command::Gc, &env, &stdin).await?;
        }
        Ok(())
    }
}

/// Lab-only pod annotation: the `ips` capability's value (comma-separated addresses). containerd
/// has no such annotation (its `ips` come from CRI callers such as Multus); the lab offers it so
/// tests can ask for a static pod address end to end.
pub const LAB_IPS_ANNOTATION: &str = "veilnet.io/lab-ips";
/// Lab-only pod annotation: the `mac` capability's value.
pub const LAB_MAC_ANNOTATION: &str = "veilnet.io/lab-mac";

/// `runtimeConfig` values the lab runtime offers, as containerd does: `portMappings` from
/// `hostPort`s and `bandwidth` from the `kubernetes.io/{ingress,egress}-bandwidth` annotations;
/// and, lab only, `ips` and `mac` from [`LAB_IPS_ANNOTATION`] and [`LAB_MAC_ANNOTATION`].
pub fn capability_args_for_pod(pod: &k8s_openapi::api::core::v1::Pod) -> Map<String, Value> {
    let mut caps = Map::new();
    let mut mappings = Vec::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        for p in c.ports.iter().flatten() {
            if let Some(host_port) = p.host_port.filter(|h| *h > 0) {
                mappings.push(serde_json::json!({
                    "hostPort": host_port,
                    "containerPort": p.container_port,
                    "protocol": p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
                    "hostIP": p.host_ip.clone().unwrap_or_default(),
                }));
            }
        }
    }
    if !mappings.is_empty() {
        caps.insert("portMappings".into(), Value::Array(mappings));
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let rate = |key: &str| annotations.get(key).and_then(|q| parse_bits_quantity(q));
    let ingress = rate("kubernetes.io/ingress-bandwidth");
    let egress = rate("kubernetes.io/egress-bandwidth");
    if ingress.is_some() || egress.is_some() {
        let mut bw = Map::new();
        if let Some(r) = ingress {
            bw.insert("ingressRate".into(), r.into());
            bw.insert("ingressBurst".into(), (u32::MAX as u64).into());
        }
        if let Some(r) = egress {
            bw.insert("egressRate".into(), r.into());
            bw.insert("egressBurst".into(), (u32::MAX as u64).into());
        }
        caps.insert("bandwidth".into(), Value::Object(bw));
    }
    if let Some(ips) = annotations.get(LAB_IPS_ANNOTATION) {
        let ips: Vec<Value> = ips
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Value::from)
            .collect();
        caps.insert("ips".into(), Value::Array(ips));
    }
    if let Some(mac) = annotations.get(LAB_MAC_ANNOTATION) {
        caps.insert("mac".into(), Value::from(mac.trim()));
    }
    caps
}

/// A Kubernetes quantity like `10M` or `1Gi` as a number (bits per second for bandwidth).
pub fn parse_bits_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let num: u64 = num.parse().ok()?;
    let mult: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    num.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIST: &str = r#"{
        "cniVersion": "1.0.0",
        "name": "labnet",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false},
             "runtimeConfig": {"stale": 1}},
            {"type": "tuning", "prevResult": {"bogus": true}}
        ]
    }"#;

    fn list() -> NetworkConfigList {
        parse_conflist(LIST.as_bytes(), "test").unwrap()
    }

    #[test]
    fn config_file_selection_is_lexical_over_cni_extensions() {
        let names = [
            "99-b.conflist",
            "10-a.conf",
            "00-readme.txt",
            "05-x.json",
            "01-dir.conf.bak",
        ];
        assert_eq!(select_config_file(&names).as_deref(), Some("05-x.json"));
        assert_eq!(select_config_file(&["a.txt"]), None);
        // Byte order, as Go's sort.Strings: upper case before lower case.
        assert_eq!(
            select_config_file(&["b.conf", "B.conf"]).as_deref(),
            Some("B.conf")
        );
    }

    #[test]
    fn conflist_parsing() {
        let l = list();
        assert_eq!(l.name, "labnet");
        assert_eq!(l.cni_version, "1.0.0");
        assert_eq!(l.plugins.len(), 3);
        assert_eq!(
            l.plugins[1].capabilities(),
            vec!["portMappings".to_string()]
        );
        assert!(!l.supports_status());
        for bad in [
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"ipam":{}}]}"#,
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
            r#"{"name":"x","plugins":[{"type":"bridge"}]}"#,
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"../evil"}]}"#,
            r#"not json"#,
        ] {
            assert!(parse_conflist(bad.as_bytes(), "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn conf_is_wrapped_into_a_list_and_cni_versions_pick_the_highest_supported() {
        let l = parse_conf(
            br#"{"cniVersion":"0.4.0","name":"single","type":"bridge","bridge":"br9"}"#,
            "t",
        )
        .unwrap();
        assert_eq!(l.name, "single");
        assert_eq!(l.cni_version, "0.4.0");
        assert_eq!(l.plugins[0].plugin_type, "bridge");
        assert_eq!(l.plugins[0].raw["bridge"], "br9");
        assert!(parse_conf(br#"{"cniVersion":"0.4.0","name":"x"}"#, "t").is_err());

        let l = parse_conflist(
            br#"{"cniVersion":"1.0.0","cniVersions":["0.4.0","1.1.0","9.9.9"],"name":"n","plugins":[{"type":"a"}]}"#,
            "t",
        )
        .unwrap();
        assert_eq!(l.cni_version, "1.1.0");
        assert!(l.supports_status() && l.supports_gc());
    }

    #[test]
    fn load_default_config_from_a_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_default_config(dir.path()),
            Err(CniError::NoConfig { .. })
        ));
        std::fs::write(dir.path().join("20-b.conflist"), LIST).unwrap();
        std::fs::write(dir.path().join("README"), "x").unwrap();
        assert_eq!(load_default_config(dir.path()).unwrap().name, "labnet");
        // The first file wins even when it is broken (as in containerd): not ready.
        std::fs::write(dir.path().join("10-a.conf"), "{broken").unwrap();
        assert!(matches!(
            load_default_config(dir.path()),
            Err(CniError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn stdin_injects_name_version_prev_result_and_declared_capabilities_only() {
        let l = list();
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24"}]});
        let mut caps = Map::new();
        caps.insert("portMappings".into(), json!([{"hostPort": 80}]));
        caps.insert("bandwidth".into(), json!({"ingressRate": 1}));

        let first = plugin_stdin(&l, &l.plugins[0], Command::Add, None, &caps);
        assert_eq!(first["name"], "labnet");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert!(first.get("runtimeConfig").is_none());
        assert_eq!(first["ipam"]["type"], "host-local");

        let second = plugin_stdin(&l, &l.plugins[1], Command::Add, Some(&prev), &caps);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 80}]})
        );

        // A prevResult in the file is replaced; nothing is sent when there is none.
        let third = plugin_stdin(&l, &l.plugins[2], Command::Add, None, &caps);
        assert!(third.get("prevResult").is_none());

        let del = plugin_stdin(&l, &l.plugins[0], Command::Del, Some(&prev), &caps);
        assert_eq!(del["prevResult"], prev);

        // 0.3.x: no prevResult for DEL.
        let old = parse_conflist(
            br#"{"cniVersion":"0.3.1","name":"o","plugins":[{"type":"bridge"}]}"#,
            "t",
        )
        .unwrap();
        let del = plugin_stdin(&old, &old.plugins[0], Command::Del, Some(&prev), &caps);
        assert!(del.get("prevResult").is_none());
    }

    #[test]
    fn env_and_cni_args() {
        let rt = RuntimeConf {
            container_id: "abc".into(),
            netns: "/run/netns/p".into(),
            ifname: "eth0".into(),
            args: kubernetes_cni_args("default", "web-0", "abc", "u-1"),
            capability_args: Map::new(),
        };
        let env: std::collections::BTreeMap<_, _> = plugin_env(Command::Add, Some(&rt), "/a:/b")
            .into_iter()
            .collect();
        assert_eq!(env["CNI_COMMAND"], "ADD");
        assert_eq!(env["CNI_CONTAINERID"], "abc");
        assert_eq!(env["CNI_NETNS"], "/run/netns/p");
        assert_eq!(env["CNI_IFNAME"], "eth0");
        assert_eq!(env["CNI_PATH"], "/a:/b");
        assert_eq!(
            env["CNI_ARGS"],
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
        );
        let status: std::collections::BTreeMap<_, _> = plugin_env(Command::Status, None, "/a")
            .into_iter()
            .collect();
        assert_eq!(status.len(), 2);
        assert_eq!(status["CNI_COMMAND"], "STATUS");
    }

    #[test]
    fn results_and_errors() {
        let r = parse_result(
            br#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],
                 "ips":[{"address":"fd00::5/64","interface":0},{"address":"10.1.0.5/24","gateway":"10.1.0.1"}]}"#,
        )
        .unwrap();
        assert_eq!(r.ips.len(), 2);
        assert_eq!(r.ips[1].gateway, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(
            r.pod_ips(),
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let old = parse_result(
            br#"{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.2.0.9/16"}]}"#,
        )
        .unwrap();
        assert_eq!(old.pod_ips(), vec!["10.2.0.9".parse::<IpAddr>().unwrap()]);
        assert!(parse_result(br#"{"cniVersion":"7.0.0"}"#).is_err());
        assert!(parse_result(br#"{"ips":[{"address":"nope"}]}"#).is_err());

        let e = parse_failure(
            "exit status: 1",
            br#"{"cniVersion":"1.0.0","code":11,"msg":"no IP addresses available","details":"range 10.1.0.0/30"}"#,
            b"",
        );
        assert_eq!(
            e.to_string(),
            "no IP addresses available; range 10.1.0.0/30"
        );
        assert!(matches!(e, PluginCallError::Reported { code: 11, .. }));
        let e = parse_failure("exit status: 2", b"", b"panic: boom\n");
        assert!(e.to_string().contains("panic: boom"));
        let wrapped = CniError::Plugin {
            plugin: "bridge".into(),
            op: "add",
            source: parse_failure("x", br#"{"code":7,"msg":"bad"}"#, b""),
        };
        assert_eq!(
            wrapped.to_string(),
            r#"plugin type="bridge" failed (add): bad"#
        );
    }

    #[test]
    fn capability_args_from_pod() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": {"kubernetes.io/ingress-bandwidth": "10M"}},
            "spec": {"containers": [{"name": "c", "ports": [
                {"containerPort": 80, "hostPort": 8080},
                {"containerPort": 53, "protocol": "UDP"}
            ]}]}
        }))
        .unwrap();
        let caps = capability_args_for_pod(&pod);
        assert_eq!(
            caps["portMappings"],
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}])
        );
        assert_eq!(caps["bandwidth"]["ingressRate"], 10_000_000);
        assert!(caps["bandwidth"].get("egressRate").is_none());
        assert_eq!(parse_bits_quantity("1Gi"), Some(1 << 30));
        assert_eq!(parse_bits_quantity("1.5M"), None);
        assert!(caps.get("ips").is_none() && caps.get("mac").is_none());
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": {
                LAB_IPS_ANNOTATION: "10.244.1.7, 10.244.1.8/24", LAB_MAC_ANNOTATION: "c2:11:22:33:44:55"}},
            "spec": {"containers": [{"name": "c"}]}
        }))
        .unwrap();
        let caps = capability_args_for_pod(&pod);
        assert_eq!(caps["ips"], json!(["10.244.1.7", "10.244.1.8/24"]));
        assert_eq!(caps["mac"], "c2:11:22:33:44:55");
    }
}
