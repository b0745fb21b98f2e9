//! The registry settings a site gives `ferry import` (plain-http registries, a CA file,
//! its registries file, retries, timeouts), carried through the import's environment.

use std::ffi::OsString;
use std::path::PathBuf;

/// The registry settings `ferry import` takes from its environment: the user's own, or those
/// the plugin passes on from plugstack.conf (`insecure_registries=`, `registry_ca_file=`),
/// written with [`ImportSettings::to_env`] and read with [`ImportSettings::from_env`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSettings {
    /// Registries reached over plain http.
    pub insecure_registries: Vec<String>,
    /// PEM CA certificates trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// The site's registries file (mirrors), read before the user's own.
    pub registries_conf: Option<PathBuf>,
    /// Further tries after a failed one (enroot's ENROOT_TRANSFER_RETRIES).
    pub retries: Option<u32>,
    /// Seconds a connection may stay silent, and to connect (ENROOT_TRANSFER_TIMEOUT).
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportSettingsError {
    #[error("{name}={value:?} is not a whole number (e.g. {name}=3)")]
    NotANumber { name: &'static str, value: String },
}

impl ImportSettings {
    pub const INSECURE_REGISTRIES: &'static str = "FERRY_INSECURE_REGISTRIES";
    pub const CA_FILE: &'static str = "FERRY_REGISTRY_CA_FILE";
    pub const REGISTRIES_CONF: &'static str = "FERRY_REGISTRIES_CONF";
    pub const RETRIES: &'static str = "FERRY_REGISTRY_RETRIES";
    pub const TIMEOUT: &'static str = "FERRY_REGISTRY_TIMEOUT";

    /// The variables that carry these settings. The list of insecure registries and the
    /// registries file are always set (empty for none), so that they replace any the user's
    /// environment has.
    pub fn to_env(&self) -> Vec<(&'static str, OsString)> {
        let mut env = vec![
            (
                Self::INSECURE_REGISTRIES,
                self.insecure_registries.join(",").into(),
            ),
            (
                Self::REGISTRIES_CONF,
                self.registries_conf.clone().unwrap_or_default().into(),
            ),
        ];
        if let Some(ca) = &self.ca_file {
            env.push((Self::CA_FILE, ca.into()));
        }
        if let Some(n) = self.retries {
            env.push((Self::RETRIES, n.to_string().into()));
        }
        if let Some(secs) = self.timeout_secs {
            env.push((Self::TIMEOUT, secs.to_string().into()));
        }
        env
    }

    /// The settings in an environment read through `get`; unset or empty variables are
    /// no setting.
    pub fn from_env(
        get: impl Fn(&str) -> Option<OsString>,
    ) -> Result<ImportSettings, ImportSettingsError> {
        let text = |name| get(name).filter(|v: &OsString| !v.is_empty());
        let number = |name: &'static str| -> Result<Option<u64>, ImportSettingsError> {
            let Some(value) = text(name) else {
                return Ok(None);
            };
            let value = value.to_string_lossy();
            if value.trim().is_empty() {
                return Ok(None);
            }
            value
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| ImportSettingsError::NotANumber {
                    name,
                    value: value.into_owned(),
                })
        };
        Ok(ImportSettings {
            insecure_registries: text(Self::INSECURE_REGISTRIES)
                .map(|list| {
                    list.to_string_lossy()
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            ca_file: text(Self::CA_FILE).map(PathBuf::from),
            registries_conf: text(Self::REGISTRIES_CONF).map(PathBuf::from),
            retries: number(Self::RETRIES)?.map(|n| n.min(u32::MAX.into()) as u32),
            timeout_secs: number(Self::TIMEOUT)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_settings_travel_through_the_environment() {
        let site = ImportSettings {
            insecure_registries: vec!["registry.site:5000".into(), "10.0.0.1".into()],
            ca_file: Some("/etc/ssl/site-ca.pem".into()),
            registries_conf: Some("/etc/ferry/registries.conf".into()),
            ..ImportSettings::default()
        };
        let env: std::collections::HashMap<_, _> = site.to_env().into_iter().collect();
        assert_eq!(ImportSettings::from_env(|n| env.get(n).cloned()), Ok(site));
        // No registries, no file: the variables are set empty, replacing the user's.
        let none = ImportSettings::default().to_env();
        assert_eq!(
            none,
            [
                (ImportSettings::INSECURE_REGISTRIES, "".into()),
                (ImportSettings::REGISTRIES_CONF, "".into())
            ]
        );
        let user = |n: &str| match n {
            ImportSettings::RETRIES => Some("2".into()),
            ImportSettings::TIMEOUT => Some(" 90 ".into()),
            ImportSettings::CA_FILE => Some("".into()),
            _ => None,
        };
        let read = ImportSettings::from_env(user).unwrap();
        assert_eq!((read.retries, read.timeout_secs), (Some(2), Some(90)));
        let bad = |n: &str| (n == ImportSettings::RETRIES).then(|| "many".into());
        assert_eq!(
            ImportSettings::from_env(bad).unwrap_err().to_string(),
            "FERRY_REGISTRY_RETRIES=\"many\" is not a whole number (e.g. FERRY_REGISTRY_RETRIES=3)"
        );
    }
}
