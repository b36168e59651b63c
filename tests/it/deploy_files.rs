//! The deployment and monitoring files hold together: every YAML file parses; every
//! file that docker-compose, the Dockerfile and the Kubernetes manifests refer to
//! exists; every configuration they run weir with passes `weir config check` with
//! the environment they set; probes, health checks and scrape targets use the port
//! that configuration listens on; pods and containers are given longer to stop
//! than `node.shutdown_grace`; the dashboards and alert rules use only the metrics
//! weir exports. Pure file checks: nothing is started but `weir config check`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use serde_norway::Value;

use crate::common;
use crate::common::promql::{
    DELIBERATELY_LEFT_OUT, EXPORTED_ON_FIRST_USE, compare_with_export, histogram_metric,
    known_metrics, metric_names,
};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// What a pod's `metadata.name` looks like, for a node id taken from it.
const SAMPLE_POD_NAME: &str = "weir-observer-7c9d6b5f4-x2x9q";
/// The address Kubernetes gives a sample pod (`status.podIP`).
const SAMPLE_POD_IP: &str = "10.1.2.3";

// ---------------------------------------------------------------------------------
// Reading files

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[track_caller]
fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every document of a YAML file, with `<<` merge keys applied as docker-compose
/// applies them.
fn yaml_documents(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = Value::deserialize(document).map_err(|e| e.to_string())?;
            apply_merges(&mut value).map_err(|e| e.to_string())?;
            Ok(value)
        })
        .filter(|document| !matches!(document, Ok(Value::Null)))
        .collect()
}

/// Applies `<<` merge keys, those brought in by a merge too: `apply_merge` makes
/// one pass, and a merged mapping can hold a merge key of its own.
fn apply_merges(value: &mut Value) -> Result<(), serde_norway::Error> {
    fn has_merge_key(value: &Value) -> bool {
        match value {
            Value::Mapping(mapping) => {
                mapping.contains_key("<<") || mapping.values().any(has_merge_key)
            }
            Value::Sequence(items) => items.iter().any(has_merge_key),
            Value::Tagged(tagged) => has_merge_key(&tagged.value),
            _ => false,
        }
    }
    while has_merge_key(value) {
        value.apply_merge()?;
    }
    Ok(())
}

#[track_caller]
fn yaml(path: &Path) -> Value {
    let mut documents =
        yaml_documents(path).unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    assert_eq!(documents.len(), 1, "{} holds one document", path.display());
    documents.remove(0)
}

/// The files under `dir` whose names end in one of `extensions`, sorted.
fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .is_some_and(|ext| extensions.iter().any(|wanted| ext == *wanted))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// `path` without `.` and `..` components, so that paths written differently compare
/// equal without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    normal
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[track_caller]
fn str_at<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {value:?}"))
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items.iter().filter_map(text).collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------
// weir config check

/// The effective configuration `weir config check` printed.
struct Checked {
    listen_port: u16,
    shutdown_grace: Duration,
    role: String,
    node_id: String,
    /// `weir run` would refuse it: a Postgres store, `http.listen` beyond
    /// loopback and no `http.advertise`.
    unadvertised: bool,
}

/// Runs `weir config check --config file` with exactly `env` as its `WEIR_*`
/// environment, as a container started with that environment would load it.
#[track_caller]
fn config_check(file: &Path, env: &BTreeMap<String, String>, what: &str) -> Checked {
    let mut command = Command::new(WEIR);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WEIR_") {
            command.env_remove(name);
        }
    }
    // --config names the file; the container's path to it means nothing here.
    command.envs(env.iter().filter(|(name, _)| *name != "WEIR_CONFIG"));
    command.arg("config").arg("check").arg("--config").arg(file);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {WEIR}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{what}: `weir config check` refuses {} with {env:?}:\n{}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let effective: toml::Value = toml::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{what}: `weir config check` printed no TOML ({e}):\n{stdout}"));
    let field = |section: &str, key: &str| -> String {
        effective[section][key]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no {section}.{key} in\n{stdout}"))
            .to_owned()
    };
    let listen = field("http", "listen");
    let listen_port = listen
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{what}: http.listen {listen:?} has no port"));
    let shutdown_grace = humantime::parse_duration(&field("node", "shutdown_grace"))
        .unwrap_or_else(|e| panic!("{what}: node.shutdown_grace: {e}"));
    let beyond_loopback = listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|address| !address.ip().is_loopback());
    let unadvertised = beyond_loopback
        && effective["store"]["kind"].as_str() == Some("postgres")
        && effective["http"].get("advertise").is_none();
    Checked {
        listen_port,
        shutdown_grace,
        role: field("node", "role"),
        node_id: field("node", "id"),
        unadvertised,
    }
}

// ---------------------------------------------------------------------------------
// The image

/// What the runtime stage of deploy/Dockerfile puts in the image.
struct Image {
    /// `ENV` of the final stage: the base layer of every container's environment.
    env: BTreeMap<String, String>,
    /// (container directory or file, repository path) of the final stage's `COPY`s.
    copies: Vec<(PathBuf, PathBuf)>,
    /// Every `COPY` source read from the build context, in any stage.
    context_sources: Vec<String>,
    entrypoint: String,
    cmd: String,
}

fn dockerfile_instructions(text: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(continued) => {
                current.push_str(continued);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

fn image() -> Image {
    let instructions = dockerfile_instructions(&read(&repo().join("deploy/Dockerfile")));
    let last_stage = instructions
        .iter()
        .rposition(|i| i.to_uppercase().starts_with("FROM "))
        .expect("deploy/Dockerfile has a FROM");
    let mut image = Image {
        env: BTreeMap::new(),
        copies: Vec::new(),
        context_sources: Vec::new(),
        entrypoint: String::new(),
        cmd: String::new(),
    };
    for (index, instruction) in instructions.iter().enumerate() {
        let (keyword, rest) = instruction.split_once(' ').unwrap_or((instruction, ""));
        let in_runtime_stage = index > last_stage;
        match keyword.to_uppercase().as_str() {
            "ENV" if in_runtime_stage => {
                for pair in rest.split_whitespace() {
                    let (name, value) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("write ENV as NAME=VALUE: {instruction}"));
                    image
                        .env
                        .insert(name.into(), value.trim_matches('"').into());
                }
            }
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if words.iter().any(|w| w.starts_with("--from")) {
                    continue;
                }
                let words: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
                let (destination, sources) = words.split_last().expect("COPY has a destination");
                for source in sources {
                    image.context_sources.push((*source).into());
                    if in_runtime_stage {
                        image.copies.push((destination.into(), repo().join(source)));
                    }
                }
            }
            "ENTRYPOINT" if in_runtime_stage => image.entrypoint = rest.into(),
            "CMD" if in_runtime_stage => image.cmd = rest.into(),
            _ => {}
        }
    }
    image
}

/// Whether .dockerignore lets `path` into the build context. Handles what the file
/// uses: `*`, plain paths and `!` exceptions, the last match deciding.
fn docker_context_includes(path: &str) -> bool {
    let ignore = read(&repo().join(".dockerignore"));
    let path = path.trim_end_matches('/');
    let mut included = true;
    for line in ignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negated, pattern) = match line.strip_prefix('!') {
            Some(pattern) => (true, pattern),
            None => (false, line),
        };
        let pattern = pattern.trim_end_matches('/');
        if pattern == "*" || path == pattern || path.starts_with(&format!("{pattern}/")) {
            included = negated;
        }
    }
    included
}

#[test]
fn the_image_copies_only_what_exists_and_runs_weir() {
    let image = image();
    assert!(!image.context_sources.is_empty());
    for source in &image.context_sources {
        assert!(
            repo().join(source).exists(),
            "deploy/Dockerfile copies {source}, which does not exist"
        );
        assert!(
            docker_context_includes(source),
            "deploy/Dockerfile copies {source}, which .dockerignore leaves out of the context"
        );
    }
    assert!(
        !docker_context_includes("target"),
        ".dockerignore must leave target/ out"
    );
    assert_eq!(image.entrypoint, r#"["weir"]"#);
    assert_eq!(image.cmd, r#"["run"]"#);
}

// ---------------------------------------------------------------------------------
// docker-compose

fn compose_path() -> PathBuf {
    repo().join("deploy/docker-compose.yml")
}

/// `${NAME:-default}` and `${NAME-default}` as docker-compose fills them in when
/// NAME is unset, and `$$` as `$`. A variable without a default is an error: the
/// file must work without any.
fn interpolate(value: &str) -> Result<String, String> {
    static VARIABLE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}").expect("valid pattern")
    });
    let mut missing = None;
    let filled = VARIABLE.replace_all(value, |captures: &regex::Captures| {
        if captures.get(1).is_none() {
            return "$".to_owned();
        }
        match captures.get(3) {
            Some(default) => default.as_str().to_owned(),
            None => {
                missing = Some(captures[1].to_owned());
                String::new()
            }
        }
    });
    match missing {
        Some(name) => Err(format!("${{{name}}} has no default in {value:?}")),
        None => Ok(filled.into_owned()),
    }
}

/// One service of the compose file.
struct Service<'a> {
    name: String,
    spec: &'a Value,
}

impl Service<'_> {
    /// Its environment, interpolated, over the image's `ENV` when it runs weir's image.
    fn environment(&self, image: &Image) -> BTreeMap<String, String> {
        let mut env = if self.runs_weir() {
            image.env.clone()
        } else {
            BTreeMap::new()
        };
        let entries: Vec<(String, String)> = match &self.spec["environment"] {
            Value::Mapping(mapping) => mapping
                .iter()
                .map(|(name, value)| {
                    (
                        text(name).unwrap_or_default(),
                        text(value).unwrap_or_default(),
                    )
                })
                .collect(),
            Value::Sequence(items) => items
                .iter()
                .filter_map(text)
                .map(|item| match item.split_once('=') {
                    Some((name, value)) => (name.to_owned(), value.to_owned()),
                    None => (item, String::new()),
                })
                .collect(),
            _ => Vec::new(),
        };
        for (name, value) in entries {
            let value = interpolate(&value)
                .unwrap_or_else(|e| panic!("service {}: {name}: {e}", self.name));
            env.insert(name, value);
        }
        env
    }

    fn runs_weir(&self) -> bool {
        self.spec["build"]["dockerfile"].as_str() == Some("deploy/Dockerfile")
    }

    fn command(&self) -> Vec<String> {
        strings(&self.spec["command"])
    }

    /// (container path, repository path) of its bind mounts; named volumes left out.
    fn bind_mounts(&self) -> Vec<(PathBuf, PathBuf)> {
        strings(&self.spec["volumes"])
            .iter()
            .filter_map(|volume| {
                let mut parts = volume.split(':');
                let source = parts.next()?;
                let target = parts.next()?;
                (source.starts_with('.') || source.starts_with('/')).then(|| {
                    (
                        PathBuf::from(target),
                        normalize(&repo().join("deploy").join(source)),
                    )
                })
            })
            .collect()
    }

    /// Where `container_path` comes from in the repository: a bind mount, else a
    /// file the image copied there (when the service runs weir's image).
    fn host_path(&self, container_path: &str, image: &Image) -> Option<PathBuf> {
        let mut layers = self.bind_mounts();
        if self.runs_weir() {
            layers.extend(image.copies.iter().cloned());
        }
        resolve(&layers, Path::new(container_path))
    }
}

/// `path` through the first of `layers` (container path, host path) that holds it,
/// the deepest mount point first as in a container.
fn resolve(layers: &[(PathBuf, PathBuf)], path: &Path) -> Option<PathBuf> {
    let mut layers: Vec<&(PathBuf, PathBuf)> = layers.iter().collect();
    layers.sort_by_key(|(target, _)| std::cmp::Reverse(target.components().count()));
    layers.iter().find_map(|(target, source)| {
        let relative = path.strip_prefix(target).ok()?;
        Some(if relative.as_os_str().is_empty() {
            source.clone()
        } else {
            source.join(relative)
        })
    })
}

fn compose() -> Value {
    yaml(&compose_path())
}

fn services(compose: &Value) -> Vec<Service<'_>> {
    compose["services"]
        .as_mapping()
        .expect("docker-compose.yml has services")
        .iter()
        .map(|(name, spec)| Service {
            name: text(name).expect("a service name"),
            spec,
        })
        .collect()
}

/// The config file a weir service runs with: `--config` or `WEIR_CONFIG`.
fn weir_config_path(service: &Service, env: &BTreeMap<String, String>) -> Option<String> {
    let command = service.command();
    command
        .iter()
        .position(|word| word == "--config")
        .and_then(|at| command.get(at + 1).cloned())
        .or_else(|| env.get("WEIR_CONFIG").cloned())
}

fn prometheus_config() -> Value {
    yaml(&repo().join("deploy/prometheus/prometheus.yml"))
}

fn weir_scrape_targets() -> BTreeSet<String> {
    let config = prometheus_config();
    let job = config["scrape_configs"]
        .as_sequence()
        .expect("prometheus.yml has scrape_configs")
        .iter()
        .find(|job| job["job_name"].as_str() == Some("weir"))
        .expect("prometheus.yml has a job named weir, which WeirNodeDown selects");
    job["static_configs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|config| strings(&config["targets"]))
        .collect()
}

#[test]
fn every_file_compose_refers_to_exists() {
    let compose = compose();
    let image = image();
    let mut weir_services = 0;
    for service in services(&compose) {
        let name = &service.name;
        if let Some(context) = service.spec["build"]["context"].as_str() {
            let context = repo().join("deploy").join(context);
            assert!(
                context.is_dir(),
                "{name}: no build context {}",
                context.display()
            );
            let dockerfile = context.join(str_at(&service.spec["build"], "dockerfile"));
            assert!(dockerfile.is_file(), "{name}: no {}", dockerfile.display());
        }
        for (target, source) in service.bind_mounts() {
            assert!(
                source.exists(),
                "{name} mounts {} at {}, which does not exist",
                source.display(),
                target.display()
            );
        }
        // Environment values that are paths inside a mount or the image name files
        // the service will read.
        for (variable, value) in service.environment(&image) {
            if !value.starts_with('/') {
                continue;
            }
            if let Some(host) = service.host_path(&value, &image) {
                assert!(
                    host.exists(),
                    "{name}: {variable}={value} is {}, which does not exist",
                    host.display()
                );
            }
        }
        if service.runs_weir() {
            weir_services += 1;
            let env = service.environment(&image);
            let config = weir_config_path(&service, &env)
                .unwrap_or_else(|| panic!("{name} names no config file"));
            let host = service
                .host_path(&config, &image)
                .unwrap_or_else(|| panic!("{name}: {config} is neither mounted nor in the image"));
            assert!(
                host.is_file(),
                "{name}: {config} is {}, which does not exist",
                host.display()
            );
        }
    }
    assert!(
        weir_services >= 4,
        "migrate, a coordinator and two observers run weir"
    );
}

#[test]
fn compose_runs_every_mounted_config_with_the_environment_it_sets() {
    let compose = compose();
    let image = image();
    let targets = weir_scrape_targets();
    let health_url =
        Regex::new(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[a-z]+)").expect("valid pattern");
    let mut roles = Vec::new();
    let mut node_ids = BTreeSet::new();
    for service in services(&compose).iter().filter(|s| s.runs_weir()) {
        let name = &service.name;
        let env = service.environment(&image);
        let config = weir_config_path(service, &env).expect("checked by another test");
        let host = service
            .host_path(&config, &image)
            .expect("checked by another test");
        // Every config beside the one named can be chosen (WEIR_CONFIG_FILE), so
        // each must work with this service's environment.
        let siblings = files_under(host.parent().expect("a config directory"), &["toml"]);
        assert!(siblings.contains(&host));
        let checked: Vec<Checked> = siblings
            .iter()
            .map(|file| {
                config_check(
                    file,
                    &env,
                    &format!("compose service {name}, {}", file.display()),
                )
            })
            .collect();
        let chosen = &checked[siblings.iter().position(|f| *f == host).expect("listed")];

        if service.command().first().map(String::as_str) == Some("migrate") {
            assert_eq!(
                service.spec["depends_on"]["postgres"]["condition"].as_str(),
                Some("service_healthy"),
                "{name} waits for Postgres"
            );
            continue;
        }
        assert!(
            !chosen.unadvertised,
            "{name}: weir run refuses a node listening beyond loopback without http.advertise"
        );
        roles.push(chosen.role.clone());
        assert!(
            node_ids.insert(chosen.node_id.clone()),
            "{name}: node id {} is taken",
            chosen.node_id
        );
        assert_eq!(
            service.spec["depends_on"]["migrate"]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{name} starts once migrate has succeeded"
        );
        let port = chosen.listen_port;
        for other in &checked {
            assert_eq!(
                other.listen_port, port,
                "{name}: every config listens on one port"
            );
        }
        let healthcheck = strings(&service.spec["healthcheck"]["test"]).join(" ");
        let probe = health_url.captures(&healthcheck).unwrap_or_else(|| {
            panic!("{name}: the health check {healthcheck:?} requests no local URL")
        });
        assert_eq!(
            probe[1].parse::<u16>().ok(),
            Some(port),
            "{name}: health check port"
        );
        assert!(
            ["/livez", "/readyz"].contains(&&probe[2]),
            "{name}: health check path {}",
            &probe[2]
        );
        let stop_grace = service.spec["stop_grace_period"]
            .as_str()
            .and_then(|grace| humantime::parse_duration(grace).ok())
            .unwrap_or(Duration::from_secs(10)); // docker's default
        assert!(
            stop_grace > chosen.shutdown_grace,
            "{name}: stop_grace_period {stop_grace:?} must exceed node.shutdown_grace {:?}",
            chosen.shutdown_grace
        );
        assert!(
            targets.contains(&format!("{name}:{port}")),
            "prometheus.yml does not scrape {name}:{port} (it scrapes {targets:?})"
        );
    }
    roles.sort();
    assert_eq!(roles, ["coordinator", "observer", "observer"]);
}

#[test]
fn compose_gives_prometheus_and_grafana_their_files() {
    let compose = compose();
    let image = image();
    let all = services(&compose);
    let service = |name: &str| {
        all.iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("docker-compose.yml has no {name} service"))
    };

    let prometheus = service("prometheus");
    let config_flag = prometheus
        .command()
        .into_iter()
        .find_map(|arg| arg.strip_prefix("--config.file=").map(str::to_owned))
        .expect("prometheus is given --config.file");
    let config = prometheus
        .host_path(&config_flag, &image)
        .expect("the Prometheus config is mounted");
    assert_eq!(config, repo().join("deploy/prometheus/prometheus.yml"));

    let grafana = service("grafana");
    let provisioning = grafana
        .host_path("/etc/grafana/provisioning", &image)
        .expect("Grafana's provisioning directory is mounted");
    assert_eq!(provisioning, repo().join("grafana/provisioning"));
    let providers = yaml(&provisioning.join("dashboards/weir.yml"));
    let dashboards_path = str_at(&providers["providers"][0]["options"], "path");
    assert_eq!(
        grafana.host_path(dashboards_path, &image),
        Some(repo().join("grafana/dashboards")),
        "the dashboard provider reads {dashboards_path}, where grafana/dashboards must be mounted"
    );

    let datasources = yaml(&provisioning.join("datasources/prometheus.yml"));
    let datasource = &datasources["datasources"][0];
    assert_eq!(str_at(datasource, "type"), "prometheus");
    let url = str_at(datasource, "url");
    let host = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("datasource url {url}"));
    service(host);
}

// ---------------------------------------------------------------------------------
// Prometheus

fn alert_rules() -> Vec<Value> {
    let rules = yaml(&repo().join("deploy/prometheus/alerts.yml"));
    rules["groups"]
        .as_sequence()
        .expect("alerts.yml has groups")
        .iter()
        .flat_map(|group| group["rules"].as_sequence().cloned().unwrap_or_default())
        .collect()
}

#[test]
fn prometheus_loads_the_alert_rules() {
    let config = prometheus_config();
    let rule_files = strings(&config["rule_files"]);
    assert!(
        rule_files.contains(&"alerts.yml".to_owned()),
        "{rule_files:?}"
    );
    for file in rule_files {
        assert!(
            repo().join("deploy/prometheus").join(&file).is_file(),
            "rule file {file}"
        );
    }
}

#[test]
fn every_alert_is_labelled_explained_and_uses_only_weir_metrics() {
    let known = known_metrics();
    let up = Regex::new(r"\bup\b").expect("a valid pattern");
    let rules = alert_rules();
    let mut names = BTreeSet::new();
    for rule in &rules {
        let name = str_at(rule, "alert");
        assert!(
            names.insert(name.to_owned()),
            "alert {name} is defined twice"
        );
        assert!(
            ["critical", "warning", "info"].contains(&str_at(&rule["labels"], "severity")),
            "{name}: severity"
        );
        for annotation in ["summary", "description"] {
            assert!(
                !str_at(&rule["annotations"], annotation).trim().is_empty(),
                "{name}: {annotation}"
            );
        }
        let expr = str_at(rule, "expr");
        let unknown: Vec<String> = metric_names(expr).difference(&known).cloned().collect();
        assert!(
            unknown.is_empty(),
            "{name} uses metrics no node exports: {unknown:?}"
        );
        assert!(
            !metric_names(expr).is_empty() || up.is_match(expr),
            "{name} watches neither a weir metric nor up"
        );
    }
    for wanted in [
        "WeirNoLeader",
        "WeirConsumerLagHigh",
        "WeirConsumerErrors",
        "WeirDeadLetters",
        "WeirNodeDown",
        "WeirNodeNotReady",
    ] {
        assert!(names.contains(wanted), "no {wanted} alert");
    }
}

#[test]
fn every_alert_has_unit_tests() {
    let tests = yaml(&repo().join("deploy/prometheus/alerts.test.yml"));
    assert_eq!(strings(&tests["rule_files"]), ["alerts.yml"]);
    let tested: BTreeSet<String> = tests["tests"]
        .as_sequence()
        .expect("alerts.test.yml has tests")
        .iter()
        .flat_map(|test| {
            test["alert_rule_test"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .map(|case| str_at(&case, "alertname").to_owned())
        .collect();
    for rule in alert_rules() {
        let name = str_at(&rule, "alert");
        assert!(
            tested.contains(name),
            "alerts.test.yml does not test {name}"
        );
    }
}

// ---------------------------------------------------------------------------------
// Kubernetes

fn k8s_dir() -> PathBuf {
    repo().join("deploy/k8s")
}

/// Every object of the manifests that kustomization.yaml lists.
fn k8s_objects() -> Vec<Value> {
    let kustomization = yaml(&k8s_dir().join("kustomization.yaml"));
    strings(&kustomization["resources"])
        .iter()
        .flat_map(|file| {
            let path = k8s_dir().join(file);
            yaml_documents(&path)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
        })
        .collect()
}

fn kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| o["kind"].as_str() == Some(kind))
        .collect()
}

fn name_of(object: &Value) -> &str {
    str_at(&object["metadata"], "name")
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector.as_mapping().is_some_and(|selector| {
        !selector.is_empty()
            && selector
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    })
}

/// A weir workload's container, checked with the configuration it would load.
struct Workload<'a> {
    name: String,
    pod: &'a Value,
    container: &'a Value,
    checked: Checked,
}

fn weir_workloads<'a>(objects: &'a [Value], scratch: &Path) -> Vec<Workload<'a>> {
    let image = image();
    let config_maps: BTreeMap<&str, &Value> = kind(objects, "ConfigMap")
        .into_iter()
        .map(|map| (name_of(map), map))
        .collect();
    ["Deployment", "Job"]
        .into_iter()
        .flat_map(|k| kind(objects, k))
        .map(|workload| {
            let name = format!("{} {}", str_at(workload, "kind"), name_of(workload));
            let pod = &workload["spec"]["template"]["spec"];
            let container = pod["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|c| c["image"].as_str().is_some_and(|i| i.split(':').next() == Some("weir")))
                .unwrap_or_else(|| panic!("{name} runs no weir container"));

            let mut env = image.env.clone();
            for variable in container["env"].as_sequence().into_iter().flatten() {
                let variable_name = str_at(variable, "name").to_owned();
                let from = &variable["valueFrom"];
                if let Some(value) = text(&variable["value"]) {
                    // Kubernetes expands `$(NAME)` of a variable set above.
                    let value = env.iter().fold(value, |value, (name, set)| {
                        value.replace(&format!("$({name})"), set)
                    });
                    env.insert(variable_name, value);
                } else if from["fieldRef"]["fieldPath"].as_str() == Some("metadata.name") {
                    env.insert(variable_name, SAMPLE_POD_NAME.into());
                } else if from["fieldRef"]["fieldPath"].as_str() == Some("status.podIP") {
                    env.insert(variable_name, SAMPLE_POD_IP.into());
                } else {
                    // A secret may be absent; the config must work without it.
                    assert_eq!(
                        from["secretKeyRef"]["optional"].as_bool(),
                        Some(true),
                        "{name}: {variable_name} must be a value, the pod name or an optional secret"
                    );
                }
            }

            let args = strings(&container["args"]);
            let config = args
                .iter()
                .position(|a| a == "--config")
                .and_then(|at| args.get(at + 1))
                .or_else(|| env.get("WEIR_CONFIG"))
                .unwrap_or_else(|| panic!("{name} names no config file"))
                .clone();
            let mount = container["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|m| Path::new(&config).starts_with(str_at(m, "mountPath")))
                .unwrap_or_else(|| panic!("{name}: nothing is mounted at {config}"));
            let key = Path::new(&config)
                .strip_prefix(str_at(mount, "mountPath"))
                .expect("under the mount")
                .to_string_lossy()
                .into_owned();
            let volume = pod["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("{name}: no volume {:?}", mount["name"]));
            let map_name = str_at(&volume["configMap"], "name");
            let map = config_maps
                .get(map_name)
                .unwrap_or_else(|| panic!("{name}: no ConfigMap {map_name}"));
            let toml = str_at(&map["data"], &key);
            let file = scratch.join(format!("{}-{key}", name_of(map)));
            std::fs::write(&file, toml).expect("write the ConfigMap's file");
            let checked = config_check(&file, &env, &name);
            assert!(
                args.first().map(String::as_str) != Some("run") || !checked.unadvertised,
                "{name}: weir run refuses a node listening beyond loopback without http.advertise"
            );
            Workload {
                name,
                pod,
                container,
                checked,
            }
        })
        .collect()
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(common::unique_name(name));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// The container port a probe or Service names, by number or by name.
fn container_port(container: &Value, port: &Value) -> Option<u16> {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).ok();
    }
    container["ports"]
        .as_sequence()?
        .iter()
        .find(|p| p["name"] == *port)
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
}

#[test]
fn kustomization_lists_every_manifest() {
    let kustomization = yaml(&k8s_dir().join("kustomization.yaml"));
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<String> = files_under(&k8s_dir(), &["yaml", "yml"])
        .iter()
        .filter_map(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|name| name != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml must list every manifest of deploy/k8s, and only those"
    );
}

#[test]
fn k8s_workloads_run_the_configmap_and_probe_its_port() {
    let objects = k8s_objects();
    let scratch = scratch_dir("k8s");
    let workloads = weir_workloads(&objects, &scratch);
    let mut roles = BTreeMap::new();
    for workload in &workloads {
        let name = &workload.name;
        if name.starts_with("Job") {
            assert_eq!(
                strings(&workload.container["args"])
                    .first()
                    .map(String::as_str),
                Some("migrate")
            );
            continue;
        }
        roles.insert(name.clone(), workload.checked.role.clone());
        let port = workload.checked.listen_port;
        for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
            let get = &workload.container[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{name}: {probe} path");
            assert_eq!(
                container_port(workload.container, &get["port"]),
                Some(port),
                "{name}: {probe} port"
            );
        }
        let grace = workload.pod["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30); // Kubernetes' default
        assert!(
            Duration::from_secs(grace) > workload.checked.shutdown_grace,
            "{name}: terminationGracePeriodSeconds {grace} must exceed node.shutdown_grace {:?}",
            workload.checked.shutdown_grace
        );
    }
    let roles: BTreeSet<&str> = roles.values().map(String::as_str).collect();
    assert_eq!(roles, BTreeSet::from(["coordinator", "observer"]));
    assert!(
        workloads.iter().any(|w| w.name.starts_with("Job")),
        "a migrate Job"
    );
    std::fs::remove_dir_all(scratch).ok();
}

#[test]
fn k8s_service_pdbs_select_the_nodes() {
    let objects = k8s_objects();
    let scratch = scratch_dir("k8s");
    let workloads = weir_workloads(&objects, &scratch);
    let deployments = kind(&objects, "Deployment");
    let pod_labels = |object: &&Value| object["spec"]["template"]["metadata"]["labels"].clone();

    let services = kind(&objects, "Service");
    let service = services
        .iter()
        .find(|s| s["metadata"]["annotations"]["prometheus.io/scrape"].as_str() == Some("true"))
        .expect("a Service annotated for Prometheus");
    let annotations = &service["metadata"]["annotations"];
    let selector = &service["spec"]["selector"];
    for deployment in &deployments {
        assert!(
            labels_match(selector, &pod_labels(deployment)),
            "the Service misses {}",
            name_of(deployment)
        );
    }
    for job in kind(&objects, "Job") {
        assert!(
            !labels_match(selector, &pod_labels(&job)),
            "the Service selects Job {}",
            name_of(job)
        );
    }
    for workload in workloads
        .iter()
        .filter(|w| w.name.starts_with("Deployment"))
    {
        let port = workload.checked.listen_port;
        assert_eq!(
            text(&annotations["prometheus.io/port"]),
            Some(port.to_string())
        );
        let service_port = &service["spec"]["ports"][0];
        assert_eq!(
            container_port(workload.container, &service_port["targetPort"]),
            Some(port),
            "{}: the Service's targetPort",
            workload.name
        );
    }
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));

    let budgets = kind(&objects, "PodDisruptionBudget");
    assert!(!budgets.is_empty(), "a PodDisruptionBudget");
    for budget in budgets {
        let selector = &budget["spec"]["selector"]["matchLabels"];
        let selected = deployments
            .iter()
            .filter(|d| labels_match(selector, &pod_labels(d)))
            .count();
        assert_eq!(
            selected,
            1,
            "PodDisruptionBudget {} selects one Deployment",
            name_of(budget)
        );
    }
    std::fs::remove_dir_all(scratch).ok();
}

// ---------------------------------------------------------------------------------
// YAML everywhere

#[test]
fn every_yaml_file_parses() {
    let mut files = files_under(&repo().join("deploy"), &["yml", "yaml"]);
    files.extend(files_under(&repo().join("grafana"), &["yml", "yaml"]));
    let names: BTreeSet<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(repo())
                .expect("in the repo")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for expected in [
        "deploy/docker-compose.yml",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts.test.yml",
        "deploy/k8s/kustomization.yaml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/weir.yml",
    ] {
        assert!(names.contains(expected), "{expected} is missing");
    }
    for file in files {
        let documents = yaml_documents(&file)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
        assert!(!documents.is_empty(), "{} is empty", file.display());
    }
}

// ---------------------------------------------------------------------------------
// Grafana dashboards

fn dashboards() -> Vec<(PathBuf, serde_json::Value)> {
    let files = files_under(&repo().join("grafana/dashboards"), &["json"]);
    assert!(
        files.len() >= 3,
        "fleet, consumers, sinks and bus dashboards"
    );
    files
        .into_iter()
        .map(|path| {
            let board = serde_json::from_str(&read(&path))
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
            (path, board)
        })
        .collect()
}

/// Every panel, those inside rows included, rows themselves left out.
fn panels(board: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut found = Vec::new();
    let mut pending: Vec<&serde_json::Value> =
        board["panels"].as_array().into_iter().flatten().collect();
    while let Some(panel) = pending.pop() {
        if panel["type"] == "row" {
            pending.extend(panel["panels"].as_array().into_iter().flatten());
        } else {
            found.push(panel);
        }
    }
    found
}

/// A Grafana query as text, whether stored as a string or as `{ "query": ... }`.
fn query_text(query: &serde_json::Value) -> String {
    query
        .as_str()
        .or_else(|| query["query"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn uses_datasource_variable(datasource: &serde_json::Value) -> bool {
    datasource["uid"] == "${datasource}" || datasource == "${datasource}"
}

#[test]
fn dashboards_have_the_variables_and_every_panel_queries() {
    let known = known_metrics();
    let mut uids = BTreeSet::new();
    for (path, board) in dashboards() {
        let file = path.display();
        assert!(
            board["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
            "{file}: schemaVersion"
        );
        let uid = board["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no uid"));
        assert!(uids.insert(uid.to_owned()), "{file}: uid {uid} is taken");

        let variables: BTreeMap<&str, &serde_json::Value> = board["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| Some((v["name"].as_str()?, v)))
            .collect();
        let datasource = variables
            .get("datasource")
            .unwrap_or_else(|| panic!("{file}: no datasource variable"));
        assert_eq!(datasource["type"], "datasource", "{file}");
        assert_eq!(datasource["query"], "prometheus", "{file}");
        for name in ["group", "instance"] {
            let variable = variables
                .get(name)
                .unwrap_or_else(|| panic!("{file}: no {name} variable"));
            assert_eq!(variable["type"], "query", "{file}: {name}");
            assert!(
                uses_datasource_variable(&variable["datasource"]),
                "{file}: {name} datasource"
            );
            let query = query_text(&variable["query"]);
            assert!(
                query.starts_with("label_values("),
                "{file}: {name} query {query:?}"
            );
            assert!(
                query.contains(&format!(", {name})")),
                "{file}: {name} query {query:?}"
            );
            let unknown: Vec<_> = metric_names(&query).difference(&known).cloned().collect();
            assert!(unknown.is_empty(), "{file}: {name} queries {unknown:?}");
        }

        let mut ids = BTreeSet::new();
        for panel in panels(&board) {
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(!title.is_empty(), "{file}: a panel without a title");
            assert!(
                ids.insert(panel["id"].as_u64()),
                "{file}: {title}: id taken"
            );
            assert!(
                uses_datasource_variable(&panel["datasource"]),
                "{file}: {title}: datasource"
            );
            let position = &panel["gridPos"];
            let right = position["x"].as_u64().unwrap_or(99) + position["w"].as_u64().unwrap_or(99);
            assert!(right <= 24, "{file}: {title} is wider than the dashboard");
            let targets = panel["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            assert!(!targets.is_empty(), "{file}: {title} has no query");
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_default();
                assert!(
                    !expr.trim().is_empty(),
                    "{file}: {title}: a target without expr"
                );
                let unknown: Vec<_> = metric_names(expr).difference(&known).cloned().collect();
                assert!(
                    unknown.is_empty(),
                    "{file}: {title} uses metrics no node exports: {unknown:?}"
                );
            }
        }
    }
}

/// The weir metrics the dashboards use.
fn dashboard_metrics() -> BTreeSet<String> {
    dashboards()
        .iter()
        .flat_map(|(_, board)| {
            panels(board)
                .into_iter()
                .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
                .flat_map(|target| metric_names(target["expr"].as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_dashboards_show_every_metric_a_running_node_exports_and_no_other() {
    let node = common::node::DemoNode::start();
    let mut exported = metric_names(&node.scrape());
    exported.extend(
        EXPORTED_ON_FIRST_USE
            .iter()
            .map(|(name, _)| name.to_string()),
    );
    assert_eq!(
        exported,
        known_metrics(),
        "a fresh node exports every catalogued metric (but those exported on first use)"
    );
    let coverage = compare_with_export(&exported, &dashboard_metrics(), DELIBERATELY_LEFT_OUT);
    assert!(coverage.is_complete(), "{coverage:?}");
}

// ---------------------------------------------------------------------------------
// The PromQL helpers of tests/it/common/promql.rs

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

#[test]
fn metric_names_finds_every_metric_of_an_expression() {
    let expr = "sum by (group) (rate(weir_consumer_events_total{group=~\"$group\"}[5m])) \
                / on (group) group_left weir_group_subscribers";
    assert_eq!(
        metric_names(expr),
        set(&["weir_consumer_events_total", "weir_group_subscribers"])
    );
}

#[test]
fn metric_names_maps_histogram_series_to_their_histogram() {
    let expr = "histogram_quantile(0.99, sum by (le) (rate(weir_handover_duration_seconds_bucket[5m]))) \
                + rate(weir_sink_publish_duration_seconds_sum[5m]) \
                / rate(weir_sink_publish_duration_seconds_count[5m])";
    assert_eq!(
        metric_names(expr),
        set(&[
            "weir_handover_duration_seconds",
            "weir_sink_publish_duration_seconds"
        ])
    );
    assert_eq!(histogram_metric("weir_build_info"), "weir_build_info");
}

#[test]
fn metric_names_ignores_strings_comments_and_longer_words() {
    let expr = "up{job=\"weir_nodes\", instance=~'weir_x.*'} # weir_in_a_comment\n\
                + my_weir_metric + label_replace(weir_build_info, \"a\", \"weir_b\", \"c\", \"d\")";
    assert_eq!(metric_names(expr), set(&["weir_build_info"]));
    assert!(metric_names("max(up) < 1").is_empty());
}

#[test]
fn metric_names_reads_a_metrics_exposition() {
    let body = "# HELP weir_consumer_events_total Events processed\n\
                # TYPE weir_consumer_events_total counter\n\
                weir_consumer_events_total{group=\"bridge\"} 12\n\
                weir_handover_duration_seconds_bucket{le=\"0.5\"} 3\n\
                weir_handover_duration_seconds_sum 0.7\n\
                process_cpu_seconds_total 1.5\n";
    assert_eq!(
        metric_names(body),
        set(&[
            "weir_consumer_events_total",
            "weir_handover_duration_seconds"
        ])
    );
}

#[test]
fn comparison_reports_both_differences() {
    let exported = set(&["weir_a", "weir_b", "weir_c"]);
    let on_dashboards = set(&["weir_b", "weir_d"]);
    let coverage = compare_with_export(&exported, &on_dashboards, &[]);
    assert_eq!(coverage.not_on_dashboards, set(&["weir_a", "weir_c"]));
    assert_eq!(coverage.not_exported, set(&["weir_d"]));
    assert!(!coverage.is_complete());
}

#[test]
fn comparison_accepts_what_is_deliberately_left_out() {
    let exported = set(&["weir_a", "weir_b"]);
    let on_dashboards = set(&["weir_b"]);
    let coverage = compare_with_export(&exported, &on_dashboards, &[("weir_a", "noise")]);
    assert!(coverage.is_complete(), "{coverage:?}");
    // Leaving a metric out does not excuse a dashboard that uses one no node exports.
    let coverage =
        compare_with_export(&set(&["weir_b"]), &set(&["weir_a"]), &[("weir_a", "noise")]);
    assert_eq!(coverage.not_exported, set(&["weir_a"]));
}

#[test]
fn the_metric_lists_name_catalogued_weir_metrics() {
    let known = known_metrics();
    for (name, why) in EXPORTED_ON_FIRST_USE.iter().chain(DELIBERATELY_LEFT_OUT) {
        assert!(
            known.contains(*name) && !why.is_empty(),
            "{name} is no weir metric"
        );
    }
    for name in &known {
        assert_eq!(metric_names(name), set(&[name.as_str()]), "{name}");
    }
}

#[test]
fn interpolation_fills_in_defaults_only() {
    assert_eq!(
        interpolate("/etc/weir/${WEIR_CONFIG_FILE:-postgres-nats.toml}").as_deref(),
        Ok("/etc/weir/postgres-nats.toml")
    );
    assert_eq!(interpolate("a${B-c}d$$e").as_deref(), Ok("acd$e"));
    assert!(interpolate("${UNSET}").is_err());
}
