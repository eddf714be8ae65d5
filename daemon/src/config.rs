//! Configuration: one [`Config`] built from the TOML file, then `PHI3D_*` environment
//! variables, then command-line flags (each later source wins), validated once with errors that
//! name the key and say how to fix it.
//!
//! [`Settings`] is the one list of keys: it is both the shape of the file (serde, unknown keys
//! rejected) and the `serve` flags with their environment variables (clap), so the three
//! sources cannot drift apart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::memory_plan::KvType;
use crate::engine::threads::ThreadPolicy;
use crate::sandbox::Requirement;
use crate::toml_lines::{self, key_line, line_of};
use crate::tools::schema_guard::SchemaLimits;

/// Where `serve` looks for its config file when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/phi3d/phi3d.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_CTX_SIZE: u32 = 4096;
pub const DEFAULT_BATCH_SIZE: u32 = 512;
pub const DEFAULT_QUEUE_SIZE: u32 = 16;
pub const DEFAULT_MAX_TOKENS: u32 = 512;
pub const DEFAULT_LOG: &str = "info";

/// Writes [`Settings`] from one list of keys, and from the same list [`KEYS`] and
/// [`Settings::overlay`], so that a key is spelled once: its doc (the flag's help), its flag
/// and variable, its type. serde and clap derive the file's shape and the flags from the struct;
/// layering two values of it and listing the file's keys are what neither derives, and a
/// dozen lines of macro cost less than a crate for each. `keys` are the file's keys (and flags);
/// `flags_only` have no key of their own in the file (it spells them inside a table).
macro_rules! settings {
    (
        keys { $( $(#[$key_attr:meta])* $key:ident: $key_type:ty, )* }
        flags_only { $( $(#[$flag_attr:meta])* $flag:ident: $flag_type:ty, )* }
    ) => {
        /// Every configuration key, each optional so that the sources can be layered.
        #[derive(Debug, Clone, Default, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $( $(#[$key_attr])* pub $key: Option<$key_type>, )*
            $( $(#[$flag_attr])* #[serde(skip)] pub $flag: Option<$flag_type>, )*
        }

        /// The keys of the config file, in the order the README documents them.
        const KEYS: &[&str] = &[$(stringify!($key)),*];

        impl Settings {
            /// Layers `over` on top of `self`: every key `over` sets wins.
            pub fn overlay(self, over: Settings) -> Settings {
                Settings { $( $key: over.$key.or(self.$key), )* $( $flag: over.$flag.or(self.$flag), )* }
            }
        }
    };
}

settings! {
    keys {
        /// GGUF file path, or a catalogue name (see `phi3d pull --list`)
        #[arg(long, env = "PHI3D_MODEL")]
        model: String,
        /// Directory holding downloaded models
        #[arg(long, env = "PHI3D_MODEL_DIR")]
        model_dir: PathBuf,
        /// Address to listen on, HOST:PORT
        #[arg(long, env = "PHI3D_LISTEN")]
        listen: String,
        /// Inference threads, fixed (default: chosen per step, up to the physical cores)
        #[arg(long, env = "PHI3D_THREADS")]
        threads: u32,
        /// Context size in tokens: the longest prompt + reply
        #[arg(long, env = "PHI3D_CTX_SIZE")]
        ctx_size: u32,
        /// Prompt tokens decoded per step; cancellation is checked between steps
        #[arg(long, env = "PHI3D_BATCH_SIZE")]
        batch_size: u32,
        /// Requests that may wait for the model; more get RESOURCE_EXHAUSTED
        #[arg(long, env = "PHI3D_QUEUE_SIZE")]
        queue_size: u32,
        /// Reply length when a request does not set max_tokens
        #[arg(long, env = "PHI3D_MAX_TOKENS")]
        max_tokens: u32,
        /// Lock the model in RAM (mlock) so it is never paged out
        #[arg(long, env = "PHI3D_MLOCK", num_args = 0..=1, default_missing_value = "true")]
        mlock: bool,
        /// Never download a model
        #[arg(long, env = "PHI3D_OFFLINE", num_args = 0..=1, default_missing_value = "true")]
        offline: bool,
        /// Log filter, e.g. "info" or "phi3d=debug,llama-cpp-2=info" (RUST_LOG wins)
        #[arg(long, env = "PHI3D_LOG")]
        log: String,
        /// Directory of plugin manifests (*.toml), watched for changes
        #[arg(long, env = "PHI3D_PLUGINS_DIR")]
        plugins_dir: PathBuf,
        /// Tool choice when a request leaves it unset: none, auto or required
        #[arg(long, env = "PHI3D_TOOL_CHOICE", value_parser = ["none", "auto", "required"])]
        tool_choice: String,
        /// The `[sandbox]` table of the file; its keys are also flags.
        #[arg(skip)]
        sandbox: SandboxSettings,
        /// Requests generated at once, each in its own sequence of one shared KV cache (1-16;
        /// default: one per 1024 tokens of ctx_size, at most 4)
        #[arg(long, env = "PHI3D_SLOTS")]
        slots: u32,
        /// KV cache element type: f16, q8_0 (about half the memory) or q4_0 (about a quarter)
        #[arg(long, env = "PHI3D_KV_TYPE", value_parser = ["f16", "q8_0", "q4_0"])]
        kv_type: String,
        /// Files holding system prompts to decode at start-up and keep cached (repeat the flag,
        /// or separate them with commas in the variable)
        #[arg(long = "pinned-prompt", env = "PHI3D_PINNED_PROMPTS", value_delimiter = ',')]
        pinned_prompts: Vec<PathBuf>,
        /// Where the prompt cache is saved across restarts
        #[arg(long, env = "PHI3D_PROMPT_CACHE_DIR")]
        prompt_cache_dir: PathBuf,
        /// Disk space the saved prompt cache may take, in MB (0: never saved)
        #[arg(long, env = "PHI3D_PROMPT_CACHE_DISK_MB")]
        prompt_cache_disk_mb: u64,
        /// RAM for cached prompts evicted from the KV cache, in MB (default: a quarter of the
        /// memory the model and its context leave free, at most 2048; 0: none)
        #[arg(long, env = "PHI3D_PROMPT_CACHE_RAM_MB")]
        prompt_cache_ram_mb: u64,
        /// Cached prompts kept in the KV cache beside the slots, so that a burst of requests
        /// does not push out a long prefix (default: one per 512 tokens of ctx_size, 2 to 16)
        #[arg(long, env = "PHI3D_PROMPT_CACHE_ENTRIES")]
        prompt_cache_entries: u32,
        /// Shortest run of cached tokens reused past a changed span, such as the time at the
        /// start of a system prompt (0: exact prefixes only)
        #[arg(long, env = "PHI3D_PROMPT_CACHE_MIN_CHUNK")]
        prompt_cache_min_chunk: u32,
        /// Longest draft of tokens guessed from the prompt and checked in one decode (lookup
        /// decoding; the text stays the same), adapted to how many are kept (0: off)
        #[arg(long, env = "PHI3D_LOOKUP_DRAFT_MAX")]
        lookup_draft_max: u32,
        /// Tokens one tool-call step may generate, whatever the request's max_tokens
        #[arg(long, env = "PHI3D_TOOL_CALL_MAX_TOKENS")]
        tool_call_max_tokens: u32,
        /// The most tool round trips a request's tools.max_steps may ask for
        #[arg(long, env = "PHI3D_MAX_TOOL_STEPS")]
        max_tool_steps: u32,

        // Who may connect, and how much one client may ask.
        /// Also listen on this Unix socket, e.g. /run/phi3d/phi3d.sock
        #[arg(long, env = "PHI3D_UNIX_SOCKET")]
        unix_socket: PathBuf,
        /// The Unix socket's permissions, in octal (default 660: owner and group)
        #[arg(long, env = "PHI3D_UNIX_SOCKET_MODE")]
        unix_socket_mode: String,
        /// The group that owns the Unix socket (name or number)
        #[arg(long, env = "PHI3D_UNIX_SOCKET_GROUP")]
        unix_socket_group: String,
        /// Bearer tokens (`phi3d token create`); when the file exists, every RPC but health needs one
        #[arg(long, env = "PHI3D_TOKEN_FILE")]
        token_file: PathBuf,
        /// TLS certificate chain (PEM) for the TCP listener
        #[arg(long, env = "PHI3D_TLS_CERT")]
        tls_cert: PathBuf,
        /// TLS private key (PEM)
        #[arg(long, env = "PHI3D_TLS_KEY")]
        tls_key: PathBuf,
        /// Require client certificates signed by this CA (PEM): mutual TLS
        #[arg(long, env = "PHI3D_TLS_CLIENT_CA")]
        tls_client_ca: PathBuf,
        /// Serve a listener reachable from the network even with no authentication configured
        #[arg(long, env = "PHI3D_ALLOW_UNAUTHENTICATED_NETWORK", num_args = 0..=1, default_missing_value = "true")]
        allow_unauthenticated_network: bool,
        /// Largest request message in bytes
        #[arg(long, env = "PHI3D_MAX_REQUEST_BYTES")]
        max_request_bytes: u32,
        /// Longest prompt in tokens (default: the context size)
        #[arg(long, env = "PHI3D_MAX_PROMPT_TOKENS")]
        max_prompt_tokens: u32,
        /// The most max_tokens a request may ask for (default: the context size)
        #[arg(long, env = "PHI3D_MAX_TOKENS_LIMIT")]
        max_tokens_limit: u32,
        /// Requests one client (token, or address without tokens) may have in flight at once
        #[arg(long, env = "PHI3D_MAX_STREAMS_PER_CLIENT")]
        max_streams_per_client: u32,
        /// Also serve the Ollama and OpenAI HTTP APIs on HOST:PORT, e.g. 127.0.0.1:11434
        #[arg(long, env = "PHI3D_HTTP_LISTEN")]
        http_listen: String,
        // What a JSON schema from a request (structured output, tool parameters) may be: each
        // limit keeps llama.cpp's schema-to-grammar converter within bounded stack and time.
        /// Largest JSON schema in a request, in bytes
        #[arg(long, env = "PHI3D_SCHEMA_MAX_BYTES")]
        schema_max_bytes: usize,
        /// Deepest nesting of a JSON schema, in JSON levels, counted through its $refs
        #[arg(long, env = "PHI3D_SCHEMA_MAX_DEPTH")]
        schema_max_depth: usize,
        /// Most properties of one object in a JSON schema
        #[arg(long, env = "PHI3D_SCHEMA_MAX_PROPERTIES")]
        schema_max_properties: usize,
        /// Longest property name, $defs name or $ref in a JSON schema, in bytes
        #[arg(long, env = "PHI3D_SCHEMA_MAX_NAME_BYTES")]
        schema_max_name_bytes: usize,
        /// Longest enum/const value, pattern or other literal in a JSON schema, in bytes
        #[arg(long, env = "PHI3D_SCHEMA_MAX_LITERAL_BYTES")]
        schema_max_literal_bytes: usize,
        /// Largest minLength/maxLength/minItems/maxItems (and the like) in a JSON schema
        #[arg(long, env = "PHI3D_SCHEMA_MAX_REPETITION")]
        schema_max_repetition: u64,
        /// Most enum values and anyOf/oneOf branches in one JSON schema, all together
        #[arg(long, env = "PHI3D_SCHEMA_MAX_ALTERNATIVES")]
        schema_max_alternatives: usize,
        /// Milliseconds a request's preparation (schemas, grammars, tokenizing) may take
        #[arg(long, env = "PHI3D_COMPILE_TIMEOUT_MS")]
        compile_timeout_ms: u64,
        /// Plugin tools offered to HTTP clients, run by phi3d: names like clock.now, or * for all
        /// (repeat the flag, or separate them with commas in the variable; default: none)
        #[arg(long = "http-plugin-tool", env = "PHI3D_HTTP_PLUGIN_TOOLS", value_delimiter = ',')]
        http_plugin_tools: Vec<String>,
        // What one TCP connection may take (gRPC and HTTP listeners), and what browsers may do.
        /// Seconds a connection has, with no request in flight, to send a request's headers (TLS
        /// handshake included)
        #[arg(long, env = "PHI3D_HEADER_TIMEOUT_SECONDS")]
        header_timeout_seconds: u64,
        /// Seconds a request's body has to arrive whole once its headers are in
        #[arg(long, env = "PHI3D_BODY_TIMEOUT_SECONDS")]
        body_timeout_seconds: u64,
        /// Seconds a kept-alive connection may wait for its next request (and a write may stall)
        #[arg(long, env = "PHI3D_IDLE_TIMEOUT_SECONDS")]
        idle_timeout_seconds: u64,
        /// TCP connections one client (peer address) may have open; more are closed at once
        #[arg(long, env = "PHI3D_MAX_CONNECTIONS_PER_CLIENT")]
        max_connections_per_client: u32,
        /// TCP connections all clients together may have open
        #[arg(long, env = "PHI3D_MAX_CONNECTIONS")]
        max_connections: u32,
        /// Browser origins (besides loopback ones) allowed to call the HTTP APIs, e.g.
        /// https://ha.example:8123; `*` in a pattern matches anything (repeat the flag, or separate
        /// them with commas in the variable)
        #[arg(long = "http-allowed-origin", env = "PHI3D_HTTP_ALLOWED_ORIGINS", value_delimiter = ',')]
        http_allowed_origins: Vec<String>,
        /// Host names (besides localhost and loopback addresses) a loopback HTTP listener answers to
        #[arg(long = "http-allowed-host", env = "PHI3D_HTTP_ALLOWED_HOSTS", value_delimiter = ',')]
        http_allowed_hosts: Vec<String>,
        // Service life and hardware: shutdown, GPU offload.
        /// Seconds requests in flight may take to finish on SIGTERM before they are cancelled
        #[arg(long, env = "PHI3D_SHUTDOWN_GRACE_SECONDS")]
        shutdown_grace_seconds: u64,
        /// Seconds phi3d goes on taking requests after SIGTERM while its health says it is
        /// stopping, so that a load balancer sends new ones elsewhere first (0: none)
        #[arg(long, env = "PHI3D_SHUTDOWN_DELAY_SECONDS")]
        shutdown_delay_seconds: u64,
        /// Model layers to offload to the GPU (needs a build with the cuda or vulkan feature; 0: none)
        #[arg(long, env = "PHI3D_GPU_LAYERS")]
        gpu_layers: u32,
        /// llama.cpp RPC workers (`phi3d rpc-worker`, IPv4:PORT or NAME:PORT) to spread the model's
        /// layers over; needs a build with the rpc feature (repeat the flag, or separate them with
        /// commas in the variable; default: none)
        #[arg(long = "rpc-worker", env = "PHI3D_RPC_WORKERS", value_delimiter = ',')]
        rpc_workers: Vec<String>,
        /// The model's layers placed on the RPC workers: the last ones, with the output layer
        /// (default: an even share, as many per worker as this board keeps)
        #[arg(long, env = "PHI3D_RPC_LAYERS")]
        rpc_layers: u32,
    }
    flags_only {
        /// strict: refuse to start a plugin whose manifest asks for protection the kernel cannot
        /// give; best-effort: run it with a loud warning
        #[arg(long = "sandbox-require", env = "PHI3D_SANDBOX_REQUIRE", value_parser = ["strict", "best-effort"])]
        sandbox_require: String,
    }
}

/// The `[sandbox]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    pub require: Option<Requirement>,
}

impl Settings {
    /// Reads the file at `path`. A missing file is an error only when the user named it.
    pub fn from_file(path: &Path, explicit: bool) -> Result<Settings, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Settings::default());
            }
            Err(err) => {
                return Err(ConfigError(format!(
                    "config file {}: {err}; pass --config PATH to an existing file",
                    path.display()
                )));
            }
        };
        Self::parse(&text).map_err(|err| ConfigError(format!("config file {}: {err}", path.display())))
    }

    /// Parses the file key by key, so that every error can name its key and line (serde's
    /// own errors for a whole struct name neither reliably).
    fn parse(text: &str) -> Result<Settings, String> {
        let table: toml::Table = toml::from_str(text).map_err(|err| {
            let line = err.span().map_or(1, |span| line_of(text, span.start));
            format!("line {line}: {}", toml_lines::message(&err))
        })?;
        for (key, value) in &table {
            let line = key_line(text, key).unwrap_or(1);
            if !KEYS.contains(&key.as_str()) {
                return Err(format!("line {line}: unknown key `{key}`; valid keys are {}", KEYS.join(", ")));
            }
            let single = toml::Table::from_iter([(key.clone(), value.clone())]);
            if let Err(err) = single.try_into::<Settings>() {
                return Err(format!("line {line}: {key}: {}", toml_lines::message(&err)));
            }
        }
        table.try_into().map_err(|err: toml::de::Error| toml_lines::message(&err))
    }
}

/// Where the configuration comes from, kept so that SIGHUP can read the file again and layer
/// the same environment and flags over it.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// Whether the user named the file (then it must exist).
    pub explicit: bool,
    /// The environment and the flags, as parsed at start-up.
    pub overrides: Settings,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        let file = Settings::from_file(&self.path, self.explicit)?;
        Config::from_settings(file.overlay(self.overrides.clone()))
    }
}

/// The most slots the default picks: beyond four, each stream gets too small a share of a
/// small board's memory bandwidth to be worth it.
pub const DEFAULT_MAX_SLOTS: u32 = 4;
pub const MAX_SLOTS: u32 = 16;
pub const DEFAULT_PROMPT_CACHE_DISK_MB: u64 = 2048;
pub const DEFAULT_MAX_PROMPT_CACHE_ENTRIES: u32 = 16;
pub const MAX_PROMPT_CACHE_ENTRIES: u32 = 64;
/// See the README's "Prompts that change early" for how this was chosen.
pub const DEFAULT_PROMPT_CACHE_MIN_CHUNK: u32 = 64;
/// See the README's "Drafts from the prompt" for how this was chosen.
pub const DEFAULT_LOOKUP_DRAFT_MAX: u32 = 8;
/// A longer draft is rarely kept whole, and each checked token costs a batch position.
pub const MAX_LOOKUP_DRAFT: u32 = 32;
/// Tokens a tool-call step may generate unless configured.
pub const DEFAULT_TOOL_CALL_MAX_TOKENS: u32 = 256;
/// The largest `tools.max_steps` unless configured.
pub const DEFAULT_MAX_TOOL_STEPS: u32 = 16;

/// Requests above this many bytes are refused unless configured: a long conversation with
/// tool schemas is tens of kilobytes.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 1024 * 1024;
/// Streams one client may have open unless configured: enough for a home's integrations
/// behind one token, while leaving most of the default queue to everyone else.
pub const DEFAULT_MAX_STREAMS_PER_CLIENT: u32 = 8;

/// Milliseconds a request's preparation may take unless configured: a large real tool set
/// compiles in well under a second on a Raspberry Pi 5.
pub const DEFAULT_COMPILE_TIMEOUT_MS: u64 = 5000;

/// Connection deadlines unless configured: headers arrive in milliseconds on a home network,
/// a 1 MiB body in well under 30 s, and a keep-alive pool (Home Assistant's) reuses its
/// connections within seconds.
pub const DEFAULT_HEADER_TIMEOUT_SECONDS: u64 = 10;
pub const DEFAULT_BODY_TIMEOUT_SECONDS: u64 = 30;
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u64 = 60;
/// Connections one client may hold unless configured: a browser opens 6 per host, an HTTP
/// client's pool a few dozen at most; a home's clients together stay far below the total.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: u32 = 64;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

/// Seconds SIGTERM waits for requests in flight unless configured: a reply of a few hundred
/// tokens on a Raspberry Pi 5 takes about that long.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 10;
/// The longest `shutdown_delay_seconds`: a balancer's checks notice a stopping daemon in
/// seconds, and systemd's stop timeout (90 s) must still cover the grace period after it.
pub const MAX_SHUTDOWN_DELAY_SECONDS: u64 = 60;

/// The most RPC workers llama.cpp connects to (GGML_RPC_MAX_SERVERS).
pub const MAX_RPC_WORKERS: usize = 16;

/// `rpc_workers`: each a `host:port` llama.cpp can parse (it splits at the first colon and
/// speaks IPv4), none twice, and only in a build that has the RPC backend.
fn check_rpc_workers(config: &Config) -> Result<(), ConfigError> {
    if config.rpc_workers.is_empty() {
        if config.rpc_layers.is_some() {
            return Err(ConfigError("rpc_layers is set but rpc_workers is empty; name the workers or drop rpc_layers".into()));
        }
        return Ok(());
    }
    if !crate::engine::rpc::available() {
        return Err(ConfigError(format!("rpc_workers: {}", crate::engine::rpc::NOT_BUILT)));
    }
    if config.rpc_workers.len() > MAX_RPC_WORKERS {
        return Err(ConfigError(format!("rpc_workers: {} workers; llama.cpp takes at most {MAX_RPC_WORKERS}", config.rpc_workers.len())));
    }
    if config.gpu_layers > 0 {
        return Err(ConfigError(
            "gpu_layers and rpc_workers are both set; phi3d places layers on one kind of device: use one of them".into(),
        ));
    }
    for (i, endpoint) in config.rpc_workers.iter().enumerate() {
        let valid = endpoint.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && !host.contains(':')
                && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && port.parse::<u16>().is_ok_and(|port| port > 0)
        });
        if !valid {
            return Err(ConfigError(format!(
                "rpc_workers: `{endpoint}` is not HOST:PORT with an IPv4 address or a name (e.g. 192.168.1.21:50052); \
                 llama.cpp's RPC client speaks IPv4 only"
            )));
        }
        if config.rpc_workers[..i].contains(endpoint) {
            return Err(ConfigError(format!("rpc_workers: `{endpoint}` is named twice")));
        }
    }
    Ok(())
}

/// The TLS files the config names; the listeners make rustls and tonic configurations of
/// them (`listeners::tls`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

/// A configuration problem, already phrased as the one line the user sees.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// A GGUF path or a catalogue name, resolved to a file by `model::resolve`.
    pub model: String,
    pub model_dir: PathBuf,
    pub listen: SocketAddr,
    pub threads: ThreadPolicy,
    pub ctx_size: u32,
    pub batch_size: u32,
    pub queue_size: u32,
    pub max_tokens: u32,
    pub mlock: bool,
    pub offline: bool,
    pub log: String,
    /// `None`: not configured; `plugins::bundled::plugins_folder` picks the default folder or
    /// the bundled manifests.
    pub plugins_dir: Option<PathBuf>,
    pub tool_choice: phi3d_proto::v1::ToolChoice,
    pub sandbox_require: Requirement,
    pub slots: u32,
    pub kv_type: KvType,
    pub pinned_prompts: Vec<PathBuf>,
    pub prompt_cache_dir: PathBuf,
    pub prompt_cache_disk_mb: u64,
    /// `None`: chosen from the memory plan once the model is loaded.
    pub prompt_cache_ram_mb: Option<u64>,
    pub prompt_cache_entries: u32,
    pub prompt_cache_min_chunk: u32,
    pub lookup_draft_max: u32,
    pub tool_call_max_tokens: u32,
    pub max_tool_steps: u32,
    pub unix_socket: Option<PathBuf>,
    pub unix_socket_mode: u32,
    pub unix_socket_group: Option<String>,
    pub token_file: PathBuf,
    pub tls: TlsFiles,
    pub allow_unauthenticated_network: bool,
    pub max_request_bytes: u32,
    pub max_prompt_tokens: u32,
    pub max_tokens_limit: u32,
    pub max_streams_per_client: u32,
    pub http_listen: Option<SocketAddr>,
    /// Plugin tools the HTTP bridges offer (`*`: all); empty: only the client's own tools.
    pub http_plugin_tools: Vec<String>,
    /// What a JSON schema from a request may be (`schema_max_*`).
    pub schema_limits: SchemaLimits,
    /// How long a request's preparation may take (`compile_timeout_ms`).
    pub compile_timeout: std::time::Duration,
    pub header_timeout_seconds: u64,
    pub body_timeout_seconds: u64,
    pub idle_timeout_seconds: u64,
    pub max_connections_per_client: u32,
    pub max_connections: u32,
    /// Origins allowed besides loopback ones (patterns; `*` matches anything).
    pub http_allowed_origins: Vec<String>,
    /// Host names a loopback HTTP listener answers to besides localhost and loopback addresses.
    pub http_allowed_hosts: Vec<String>,

    // Service life and hardware.
    pub shutdown_grace_seconds: u64,
    pub shutdown_delay_seconds: u64,
    pub gpu_layers: u32,
    /// llama.cpp RPC workers (`host:port`), in the order layers are placed on them.
    pub rpc_workers: Vec<String>,
    /// Layers on the workers; `None`: an even share, chosen once the model's depth is known.
    pub rpc_layers: Option<u32>,
}

impl Config {
    pub fn from_settings(settings: Settings) -> Result<Config, ConfigError> {
        let listen_text = settings.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text.parse().map_err(|_| {
            ConfigError(format!(
                "listen: `{listen_text}` is not an IP:PORT address; use e.g. 127.0.0.1:50051 \
                 (or 0.0.0.0:50051 to serve the whole network)"
            ))
        })?;
        let ctx_size = settings.ctx_size.unwrap_or(DEFAULT_CTX_SIZE);
        let max_tokens_limit = settings.max_tokens_limit.unwrap_or(ctx_size);
        let kv_type = match settings.kv_type.as_deref() {
            None => KvType::F16,
            Some(text) => text.parse().map_err(|err| ConfigError(format!("kv_type: {err}")))?,
        };
        let config = Config {
            model: settings
                .model
                .unwrap_or_else(|| crate::model::catalogue::DEFAULT_MODEL.to_owned()),
            model_dir: settings.model_dir.unwrap_or_else(default_model_dir),
            listen,
            threads: ThreadPolicy::from_setting(settings.threads),
            ctx_size,
            batch_size: settings.batch_size.unwrap_or(DEFAULT_BATCH_SIZE),
            queue_size: settings.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            // A limit below the default lowers the default with it; only two explicit values
            // can disagree.
            max_tokens: settings.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS.min(max_tokens_limit)),
            mlock: settings.mlock.unwrap_or(false),
            offline: settings.offline.unwrap_or(false),
            log: settings.log.unwrap_or_else(|| DEFAULT_LOG.to_owned()),
            plugins_dir: settings.plugins_dir,
            tool_choice: match settings.tool_choice.as_deref() {
                None | Some("none") => phi3d_proto::v1::ToolChoice::None,
                Some("auto") => phi3d_proto::v1::ToolChoice::Auto,
                Some("required") => phi3d_proto::v1::ToolChoice::Required,
                Some(other) => {
                    return Err(ConfigError(format!("tool_choice: `{other}` is not one of none, auto, required")));
                }
            },
            // The flag (or its variable) wins over the file's [sandbox] table.
            sandbox_require: match settings.sandbox_require.as_deref() {
                Some("strict") => Requirement::Strict,
                Some(_) => Requirement::BestEffort,
                None => settings.sandbox.and_then(|sandbox| sandbox.require).unwrap_or(Requirement::BestEffort),
            },
            // The slots share one KV cache of ctx_size cells; by default each gets 1024 on
            // average, so that a busy daemon still serves prompts of that length at once.
            slots: settings.slots.unwrap_or((ctx_size / 1024).clamp(1, DEFAULT_MAX_SLOTS)),
            kv_type,
            pinned_prompts: settings.pinned_prompts.unwrap_or_default(),
            prompt_cache_dir: settings.prompt_cache_dir.unwrap_or_else(default_prompt_cache_dir),
            prompt_cache_disk_mb: settings.prompt_cache_disk_mb.unwrap_or(DEFAULT_PROMPT_CACHE_DISK_MB),
            // Entries cost no cells while they share them with a slot, and are evicted when
            // cells run short; their number only bounds the sequences set aside for them.
            prompt_cache_entries: settings
                .prompt_cache_entries
                .unwrap_or((ctx_size / 512).clamp(2, DEFAULT_MAX_PROMPT_CACHE_ENTRIES)),
            prompt_cache_min_chunk: settings.prompt_cache_min_chunk.unwrap_or(DEFAULT_PROMPT_CACHE_MIN_CHUNK),
            lookup_draft_max: settings.lookup_draft_max.unwrap_or(DEFAULT_LOOKUP_DRAFT_MAX),
            prompt_cache_ram_mb: settings.prompt_cache_ram_mb,
            // As for max_tokens: a limit below the default lowers the default with it.
            tool_call_max_tokens: settings
                .tool_call_max_tokens
                .unwrap_or(DEFAULT_TOOL_CALL_MAX_TOKENS.min(max_tokens_limit)),
            max_tool_steps: settings.max_tool_steps.unwrap_or(DEFAULT_MAX_TOOL_STEPS),
            unix_socket: settings.unix_socket,
            unix_socket_mode: match settings.unix_socket_mode.as_deref() {
                None => 0o660,
                Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|mode| *mode <= 0o777)
                    .ok_or_else(|| {
                        ConfigError(format!("unix_socket_mode: `{text}` is not an octal mode such as 660 or 600"))
                    })?,
            },
            unix_socket_group: settings.unix_socket_group,
            token_file: settings.token_file.unwrap_or_else(|| PathBuf::from(crate::auth::tokens::DEFAULT_TOKEN_FILE)),
            tls: TlsFiles {
                cert: settings.tls_cert,
                key: settings.tls_key,
                client_ca: settings.tls_client_ca,
            },
            allow_unauthenticated_network: settings.allow_unauthenticated_network.unwrap_or(false),
            max_request_bytes: settings.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES),
            max_prompt_tokens: settings.max_prompt_tokens.unwrap_or(ctx_size),
            max_tokens_limit,
            max_streams_per_client: settings.max_streams_per_client.unwrap_or(DEFAULT_MAX_STREAMS_PER_CLIENT),
            http_listen: match settings.http_listen.as_deref() {
                None => None,
                Some(text) => Some(text.parse().map_err(|_| {
                    ConfigError(format!(
                        "http_listen: `{text}` is not an IP:PORT address; use e.g. 127.0.0.1:11434 (Ollama's port)"
                    ))
                })?),
            },
            http_plugin_tools: settings.http_plugin_tools.unwrap_or_default(),
            schema_limits: {
                let defaults = SchemaLimits::default();
                SchemaLimits {
                    max_bytes: settings.schema_max_bytes.unwrap_or(defaults.max_bytes),
                    max_depth: settings.schema_max_depth.unwrap_or(defaults.max_depth),
                    max_properties: settings.schema_max_properties.unwrap_or(defaults.max_properties),
                    max_name_bytes: settings.schema_max_name_bytes.unwrap_or(defaults.max_name_bytes),
                    max_literal_bytes: settings.schema_max_literal_bytes.unwrap_or(defaults.max_literal_bytes),
                    max_repetition: settings.schema_max_repetition.unwrap_or(defaults.max_repetition),
                    max_alternatives: settings.schema_max_alternatives.unwrap_or(defaults.max_alternatives),
                }
            },
            compile_timeout: std::time::Duration::from_millis(
                settings.compile_timeout_ms.unwrap_or(DEFAULT_COMPILE_TIMEOUT_MS),
            ),
            header_timeout_seconds: settings.header_timeout_seconds.unwrap_or(DEFAULT_HEADER_TIMEOUT_SECONDS),
            body_timeout_seconds: settings.body_timeout_seconds.unwrap_or(DEFAULT_BODY_TIMEOUT_SECONDS),
            idle_timeout_seconds: settings.idle_timeout_seconds.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECONDS),
            max_connections_per_client: settings
                .max_connections_per_client
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_CLIENT),
            max_connections: settings.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            http_allowed_origins: settings.http_allowed_origins.unwrap_or_default(),
            http_allowed_hosts: settings.http_allowed_hosts.unwrap_or_default(),
            shutdown_grace_seconds: settings.shutdown_grace_seconds.unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECONDS),
            shutdown_delay_seconds: settings.shutdown_delay_seconds.unwrap_or(0),
            gpu_layers: settings.gpu_layers.unwrap_or(0),
            rpc_workers: settings.rpc_workers.unwrap_or_default(),
            rpc_layers: settings.rpc_layers,
        };
        check_rpc_workers(&config)?;
        if config.shutdown_delay_seconds > MAX_SHUTDOWN_DELAY_SECONDS {
            return Err(ConfigError(format!(
                "shutdown_delay_seconds: {} is out of range; it must be 0 to {MAX_SHUTDOWN_DELAY_SECONDS}",
                config.shutdown_delay_seconds
            )));
        }
        if !(1..=MAX_SLOTS).contains(&config.slots) {
            return Err(ConfigError(format!("slots: {} is out of range; it must be 1 to {MAX_SLOTS}", config.slots)));
        }
        if config.prompt_cache_entries > MAX_PROMPT_CACHE_ENTRIES {
            return Err(ConfigError(format!(
                "prompt_cache_entries: {} is out of range; it must be 0 to {MAX_PROMPT_CACHE_ENTRIES}",
                config.prompt_cache_entries
            )));
        }
        if config.lookup_draft_max > MAX_LOOKUP_DRAFT {
            return Err(ConfigError(format!(
                "lookup_draft_max: {} is out of range; it must be 0 (off) to {MAX_LOOKUP_DRAFT}",
                config.lookup_draft_max
            )));
        }
        at_least("tool_call_max_tokens", config.tool_call_max_tokens, 1)?;
        at_least("max_tool_steps", config.max_tool_steps, 1)?;
        if let ThreadPolicy::Fixed(count) = config.threads {
            at_least("threads", count, 1)?;
        }
        at_least("ctx_size", config.ctx_size, 64)?;
        at_least("batch_size", config.batch_size, 1)?;
        at_least("queue_size", config.queue_size, 1)?;
        at_least("max_tokens", config.max_tokens, 1)?;
        at_least("max_request_bytes", config.max_request_bytes, 1024)?;
        at_least("max_prompt_tokens", config.max_prompt_tokens, 1)?;
        at_least("max_tokens_limit", config.max_tokens_limit, 1)?;
        at_least("max_streams_per_client", config.max_streams_per_client, 1)?;
        at_least("max_connections_per_client", config.max_connections_per_client, 1)?;
        at_least("max_connections", config.max_connections, 1)?;
        for (key, seconds) in [
            ("header_timeout_seconds", config.header_timeout_seconds),
            ("body_timeout_seconds", config.body_timeout_seconds),
            ("idle_timeout_seconds", config.idle_timeout_seconds),
        ] {
            if seconds == 0 {
                return Err(ConfigError(format!("{key}: 0 is too small; it must be at least 1")));
            }
        }
        if let Some(bad) = config.http_allowed_origins.iter().find(|origin| !valid_origin_pattern(origin)) {
            return Err(ConfigError(format!(
                "http_allowed_origins: `{bad}` is not an origin; write scheme://host[:port] as a browser sends it, \
                 e.g. https://ha.example:8123 (`*` matches anything, e.g. http://192.168.1.*)"
            )));
        }
        if let Some(bad) = config.http_allowed_hosts.iter().find(|host| !valid_host(host)) {
            return Err(ConfigError(format!(
                "http_allowed_hosts: `{bad}` is not a host name; write it without scheme or port, e.g. phi3d.lan"
            )));
        }
        if config.max_tokens > config.max_tokens_limit {
            return Err(ConfigError(format!(
                "max_tokens: the default reply length {} is above max_tokens_limit {}; lower one or raise the other",
                config.max_tokens, config.max_tokens_limit
            )));
        }
        if config.tool_call_max_tokens > config.max_tokens_limit {
            return Err(ConfigError(format!(
                "tool_call_max_tokens: a tool-call step's budget {} is above max_tokens_limit {}; \
                 every token budget stays within the limit, so lower one or raise the other",
                config.tool_call_max_tokens, config.max_tokens_limit
            )));
        }
        let limits = config.schema_limits;
        for (key, value) in [
            ("schema_max_bytes", limits.max_bytes),
            ("schema_max_depth", limits.max_depth),
            ("schema_max_properties", limits.max_properties),
            ("schema_max_name_bytes", limits.max_name_bytes),
            ("schema_max_literal_bytes", limits.max_literal_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{key}: 0 is too small; it must be at least 1")));
            }
        }
        if config.compile_timeout.is_zero() {
            return Err(ConfigError("compile_timeout_ms: 0 is too small; it must be at least 1".into()));
        }
        if config.model.trim().is_empty() {
            return Err(ConfigError(
                "model: empty; set a GGUF path or a catalogue name such as phi-3-mini-4k-instruct"
                    .into(),
            ));
        }
        Ok(config)
    }
}

fn at_least(key: &str, value: u32, min: u32) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError(format!("{key}: {value} is too small; it must be at least {min}")));
    }
    Ok(())
}

/// systemd's `StateDirectory=` when run as a service, else the user's cache directory.
fn default_model_dir() -> PathBuf {
    state_or_cache_dir("models")
}

fn default_prompt_cache_dir() -> PathBuf {
    state_or_cache_dir("prompt-cache")
}

fn state_or_cache_dir(name: &str) -> PathBuf {
    if let Some(state) = std::env::var_os("STATE_DIRECTORY") {
        return PathBuf::from(state).join(name);
    }
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(cache).join("phi3d").join(name);
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache/phi3d").join(name);
    }
    PathBuf::from("/var/lib/phi3d").join(name)
}

// The syntax of the HTTP listener's browser rules, checked here so that a bad entry stops
// start-up; `http::browsers` matches requests against entries that passed.
/// Whether `pattern` can be an `http_allowed_origins` entry: `*`, `null`, or scheme://host[:port].
fn valid_origin_pattern(pattern: &str) -> bool {
    let pattern = pattern.trim();
    if pattern == "*" || pattern == "null" {
        return true;
    }
    match pattern.split_once("://") {
        Some((scheme, authority)) => {
            !scheme.is_empty()
                && !authority.is_empty()
                && !authority.trim_end_matches('/').contains('/')
                && !pattern.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

/// Whether `host` can be an `http_allowed_hosts` entry: a bare host name or address.
fn valid_host(host: &str) -> bool {
    !host.is_empty() && !host.contains("://") && !host.contains('/') && !host.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Settings::parse("ctx_size = 2048\nctx_sise = 4096\n").unwrap_err();
        assert!(err.contains("unknown key `ctx_sise`"), "{err}");
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(err.contains("ctx_size"), "the valid keys are listed: {err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Settings::parse("threads = 2\nctx_size = \"big\"\n").unwrap_err();
        assert!(err.starts_with("line 2: ctx_size:"), "{err}");
        assert!(err.contains("u32"), "{err}");
        let err = Settings::parse("threads = 2\nctx_size = [\n").unwrap_err();
        assert!(err.starts_with("line 2:") || err.starts_with("line 3:"), "{err}");
    }

    #[test]
    fn browser_rule_entries() {
        assert!(valid_origin_pattern("https://ha.example:8123") && valid_origin_pattern("*"));
        assert!(!valid_origin_pattern("ha.example") && !valid_origin_pattern("http://a/b"));
        assert!(valid_host("phi3d.lan") && !valid_host("http://phi3d.lan"));
    }

    #[test]
    fn rpc_workers_are_checked() {
        let config = |text: &str| Settings::parse(text).map_err(ConfigError).and_then(Config::from_settings);
        if !crate::engine::rpc::available() {
            // The portable builds (deploy/test-aarch64.sh runs these tests in one) leave it out.
            let refused = config("rpc_workers = [\"10.8.0.2:50052\"]").unwrap_err().to_string();
            assert!(refused.contains("no RPC backend"), "{refused}");
            return;
        }
        let accepted = config("rpc_workers = [\"10.8.0.2:50052\", \"board3.lan:50052\"]\nrpc_layers = 20").unwrap();
        assert_eq!((accepted.rpc_workers.len(), accepted.rpc_layers), (2, Some(20)));
        for (text, expected) in [
            ("rpc_workers = [\"[::1]:50052\"]", "IPv4"),
            ("rpc_workers = [\"10.8.0.2\"]", "HOST:PORT"),
            ("rpc_workers = [\"10.8.0.2:0\"]", "HOST:PORT"),
            ("rpc_workers = [\"a b:1\"]", "HOST:PORT"),
            ("rpc_workers = [\"10.8.0.2:1\", \"10.8.0.2:1\"]", "named twice"),
            ("rpc_workers = [\"10.8.0.2:1\"]\ngpu_layers = 4", "gpu_layers and rpc_workers"),
            ("rpc_layers = 4", "rpc_workers is empty"),
        ] {
            let refused = config(text).unwrap_err().to_string();
            assert!(refused.contains(expected), "{text}: {refused}");
        }
    }

    #[test]
    fn every_key_is_accepted() {
        let file = "model = \"m.gguf\"\nmodel_dir = \"/m\"\nlisten = \"127.0.0.1:1\"\nthreads = 1\nctx_size = 64\n\
                    batch_size = 1\nqueue_size = 1\nmax_tokens = 1\nmlock = true\noffline = true\nlog = \"warn\"\n\
                    plugins_dir = \"/p\"\ntool_choice = \"auto\"\nsandbox = { require = \"strict\" }\nslots = 2\n\
                    kv_type = \"q8_0\"\npinned_prompts = [\"/etc/phi3d/home.txt\"]\nprompt_cache_dir = \"/c\"\n\
                    prompt_cache_disk_mb = 10\nprompt_cache_entries = 5\nprompt_cache_min_chunk = 48\nprompt_cache_ram_mb = 64\n\
                    lookup_draft_max = 5\ntool_call_max_tokens = 16\nmax_tool_steps = 8\n\
                    unix_socket = \"/run/phi3d/phi3d.sock\"\nunix_socket_mode = \"600\"\nunix_socket_group = \"phi3d\"\n\
                    token_file = \"/t.toml\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\ntls_client_ca = \"/ca.pem\"\n\
                    allow_unauthenticated_network = true\nmax_request_bytes = 4096\nmax_prompt_tokens = 32\n\
                    max_tokens_limit = 16\nmax_streams_per_client = 2\nhttp_listen = \"127.0.0.1:11434\"\n\
                    http_plugin_tools = [\"clock.now\"]\nshutdown_grace_seconds = 3\nshutdown_delay_seconds = 2\ngpu_layers = 99\n\
                    schema_max_bytes = 1000\nschema_max_depth = 9\nschema_max_properties = 8\n\
                    schema_max_name_bytes = 32\nschema_max_literal_bytes = 64\nschema_max_repetition = 10\n\
                    schema_max_alternatives = 20\ncompile_timeout_ms = 250\nheader_timeout_seconds = 5\nbody_timeout_seconds = 6\n\
                    idle_timeout_seconds = 7\nmax_connections_per_client = 3\nmax_connections = 9\n\
                    http_allowed_origins = [\"https://ha.example:8123\"]\nhttp_allowed_hosts = [\"phi3d.lan\"]\n\
                    rpc_workers = [\"10.8.0.2:50052\"]\nrpc_layers = 8\n";
        let mut settings = Settings::parse(file).unwrap();
        assert!(file.lines().count() == KEYS.len() && KEYS.iter().all(|key| file.contains(&format!("{key} ="))));
        // The RPC keys exclude gpu_layers and depend on the build: rpc_workers_are_checked.
        assert_eq!((settings.rpc_workers.take().unwrap(), settings.rpc_layers.take()), (vec!["10.8.0.2:50052".to_owned()], Some(8)));
        assert_eq!(settings.log.as_deref(), Some("warn"));
        assert_eq!(settings.mlock, Some(true));
        let config = Config::from_settings(settings).unwrap();
        assert_eq!(config.sandbox_require, Requirement::Strict);
        assert_eq!(config.tool_choice, phi3d_proto::v1::ToolChoice::Auto);
        assert_eq!((config.slots, config.kv_type), (2, KvType::Q8_0));
        assert_eq!((config.prompt_cache_entries, config.prompt_cache_min_chunk), (5, 48));
        assert_eq!(config.lookup_draft_max, 5);
        assert_eq!(config.pinned_prompts, [PathBuf::from("/etc/phi3d/home.txt")]);
        assert_eq!((config.unix_socket_mode, config.max_tokens_limit, config.max_streams_per_client), (0o600, 16, 2));
        assert_eq!((config.shutdown_grace_seconds, config.shutdown_delay_seconds, config.gpu_layers), (3, 2, 99));
        assert_eq!(config.http_plugin_tools, ["clock.now"]);
        let limits = config.schema_limits;
        assert_eq!((limits.max_bytes, limits.max_depth, limits.max_properties), (1000, 9, 8));
        assert_eq!((limits.max_name_bytes, limits.max_literal_bytes, limits.max_repetition, limits.max_alternatives), (32, 64, 10, 20));
        assert_eq!(config.compile_timeout, std::time::Duration::from_millis(250));
        let timeouts = (config.header_timeout_seconds, config.body_timeout_seconds, config.idle_timeout_seconds);
        assert_eq!((timeouts, config.max_connections_per_client, config.max_connections), ((5, 6, 7), 3, 9));
        assert_eq!((config.http_allowed_origins.as_slice(), config.http_allowed_hosts.as_slice()), (&["https://ha.example:8123".to_owned()][..], &["phi3d.lan".to_owned()][..]));
        let err = Settings::parse("[sandbox]\nrequire = \"always\"\n").unwrap_err();
        assert!(err.starts_with("line 1: sandbox:") && err.contains("strict"), "{err}");
    }

    #[test]
    fn later_sources_win() {
        let file = Settings::parse("ctx_size = 2048\nthreads = 3\n").unwrap();
        let flags = Settings { ctx_size: Some(1024), ..Settings::default() };
        let merged = file.overlay(flags);
        assert_eq!(merged.ctx_size, Some(1024));
        assert_eq!(merged.threads, Some(3));
    }

    #[test]
    fn defaults_are_safe() {
        let config = Config::from_settings(Settings::default()).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert!(config.listen.ip().is_loopback());
        assert_eq!(config.ctx_size, DEFAULT_CTX_SIZE);
        assert!(config.threads.max() >= 1);
        assert_eq!(config.slots, 4, "4096 cells: four slots of 1024 on average");
        let small = Config::from_settings(Settings { ctx_size: Some(512), ..Settings::default() }).unwrap();
        assert_eq!(small.slots, 1);
    }

    #[test]
    fn slots_and_kv_type_are_checked() {
        let err = Config::from_settings(Settings { slots: Some(0), ..Settings::default() }).unwrap_err().to_string();
        assert!(err.starts_with("slots:") && err.contains("1 to 16"), "{err}");
        let err = Settings::parse("kv_type = 8\n").unwrap_err();
        assert!(err.starts_with("line 1: kv_type:"), "{err}");
        let settings = Settings { kv_type: Some("q5".into()), ..Settings::default() };
        let err = Config::from_settings(settings).unwrap_err().to_string();
        assert!(err.starts_with("kv_type:") && err.contains("q8_0"), "{err}");
    }

    #[test]
    fn limits_are_checked_and_a_low_limit_lowers_the_default() {
        let low = Config::from_settings(Settings { max_tokens_limit: Some(20), ..Settings::default() }).unwrap();
        assert_eq!((low.max_tokens, low.max_tokens_limit), (20, 20));
        let both = Settings { max_tokens: Some(30), max_tokens_limit: Some(20), ..Settings::default() };
        let err = Config::from_settings(both).unwrap_err().to_string();
        assert!(err.starts_with("max_tokens:") && err.contains("max_tokens_limit 20"), "{err}");
        assert_eq!(low.tool_call_max_tokens, 20, "the call budget follows a low limit down");
        let call = Settings { tool_call_max_tokens: Some(256), max_tokens_limit: Some(16), ..Settings::default() };
        let err = Config::from_settings(call).unwrap_err().to_string();
        assert!(err.starts_with("tool_call_max_tokens:") && err.contains("max_tokens_limit 16"), "{err}");
        let err = Config::from_settings(Settings { unix_socket_mode: Some("rw".into()), ..Settings::default() })
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("unix_socket_mode:"), "{err}");
        let err = Config::from_settings(Settings { max_request_bytes: Some(10), ..Settings::default() })
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("max_request_bytes:"), "{err}");
    }

    #[test]
    fn bad_listen_names_the_key() {
        let settings = Settings { listen: Some("localhost".into()), ..Settings::default() };
        let err = Config::from_settings(settings).unwrap_err().to_string();
        assert!(err.starts_with("listen:"), "{err}");
    }
}
