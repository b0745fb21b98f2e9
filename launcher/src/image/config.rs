//! The image config blob: what a container started from the image should look like.
//!
//! Plain serde structs rather than the `oci-spec` crate: five fields of one document are
//! needed, docker-written configs put `null` where OCI says "absent" (which strict typed
//! models refuse), and the build stays small on the shared build machines.

use serde::{Deserialize, Serialize};

/// The run-time part of an image config (OCI `config` / docker `config` object).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    /// `NAME=VALUE` strings, in order.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The whole config blob, as far as ferry reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFile {
    pub architecture: Option<String>,
    pub os: Option<String>,
    pub config: ImageConfig,
    /// sha256 digests of the uncompressed layers, bottom first.
    pub diff_ids: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed image config: {0}")]
pub struct ConfigError(String);

#[derive(Deserialize)]
struct RawFile {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<RawConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Option<Vec<String>>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

impl ConfigFile {
    pub fn parse(bytes: &[u8]) -> Result<ConfigFile, ConfigError> {
        let raw: RawFile = serde_json::from_slice(bytes).map_err(|e| ConfigError(e.to_string()))?;
        let c = raw.config.unwrap_or_default();
        Ok(ConfigFile {
            architecture: non_empty(raw.architecture),
            os: non_empty(raw.os),
            config: ImageConfig::from_raw(c),
            diff_ids: raw.rootfs.and_then(|r| r.diff_ids).unwrap_or_default(),
        })
    }
}

impl ImageConfig {
    fn from_raw(c: RawConfig) -> ImageConfig {
        ImageConfig {
            env: c.env.unwrap_or_default(),
            working_dir: non_empty(c.working_dir),
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            user: non_empty(c.user),
        }
    }

    /// Parse the `config` object of a legacy (pre-manifest) docker image's `json` file,
    /// which uses the same names as a config blob's `config`.
    pub fn parse_legacy(config: &serde_json::Value) -> ImageConfig {
        let raw: RawConfig = serde_json::from_value(config.clone()).unwrap_or_default();
        ImageConfig::from_raw(raw)
    }

    /// The environment as (name, value) pairs; entries without `=` are dropped, as
    /// docker does.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter_map(|e| e.split_once('='))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_and_oci_configs() {
        let docker = br#"{"architecture":"amd64","os":"linux",
            "config":{"Env":["PATH=/usr/bin:/bin","A=b=c","junk"],"Cmd":["/bin/sh"],
                      "WorkingDir":"","Entrypoint":null,"User":"","Labels":null},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"history":[]}"#;
        let c = ConfigFile::parse(docker).unwrap();
        assert_eq!(c.architecture.as_deref(), Some("amd64"));
        assert_eq!(c.config.working_dir, None);
        assert_eq!(c.config.entrypoint, None);
        assert_eq!(c.config.cmd, Some(vec!["/bin/sh".to_string()]));
        assert_eq!(c.diff_ids, vec!["sha256:aa".to_string()]);
        assert_eq!(
            c.config.env_pairs(),
            vec![
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
                ("A".to_string(), "b=c".to_string())
            ]
        );
        let oci = br#"{"architecture":"arm64","os":"linux","config":{"WorkingDir":"/w","User":"1000:1000","Env":null},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = ConfigFile::parse(oci).unwrap();
        assert_eq!(c.config.working_dir.as_deref(), Some("/w"));
        assert_eq!(c.config.user.as_deref(), Some("1000:1000"));
        assert!(c.config.env.is_empty());
        // Minimal configs (no config object at all) are valid.
        assert_eq!(ConfigFile::parse(b"{}").unwrap(), ConfigFile::default());
    }

    #[test]
    fn malformed_configs_are_refused() {
        let e = ConfigFile::parse(b"{\"config\":{\"Env\":\"PATH=/bin\"}}").unwrap_err();
        assert!(e.to_string().starts_with("malformed image config"), "{e}");
        assert!(ConfigFile::parse(b"[").is_err());
    }

    #[test]
    fn round_trips_through_the_cache_json() {
        let c = ImageConfig {
            env: vec!["A=1".into()],
            working_dir: Some("/w".into()),
            entrypoint: Some(vec!["/e".into()]),
            cmd: None,
            user: None,
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ImageConfig>(&json).unwrap(), c);
    }
}
