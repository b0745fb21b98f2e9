//! Which GPUs a container gets, as users, admins and the scheduler write it.

use serde::{Deserialize, Serialize};

/// Which GPUs a container gets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GpuRequest {
    /// No GPU: the host's NVIDIA device nodes are hidden and no driver file is added.
    #[default]
    None,
    /// Every GPU of the node.
    All,
    /// These GPUs, by index: index N is the device node `/dev/nvidiaN`, as in Slurm's
    /// `SLURM_STEP_GPUS` and a `gres.conf` that lists `File=/dev/nvidia[0-N]`.
    Devices(Vec<u32>),
}

/// A GPU list that is neither `none`, `all` nor indexes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("GPU list `{0}`: write none, all, or indexes such as 0,2")]
pub struct BadGpuList(pub String);

impl GpuRequest {
    /// What a user or admin writes: `none`, `all`, or a comma list of indexes.
    pub fn parse(text: &str) -> Result<GpuRequest, BadGpuList> {
        match text.trim() {
            "none" | "no" | "" => Ok(GpuRequest::None),
            "all" => Ok(GpuRequest::All),
            list => list
                .split(',')
                .map(|i| i.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .map(GpuRequest::Devices)
                .map_err(|_| BadGpuList(text.to_string())),
        }
    }

    /// The GPUs a scheduler gave this job step, from its environment: Slurm's
    /// `SLURM_STEP_GPUS` (the step's GPUs on this node, as device indexes), else
    /// `CUDA_VISIBLE_DEVICES`, else `NVIDIA_VISIBLE_DEVICES` (as container runtimes read it).
    /// Values that name no device (`NoDevFiles`, `-1`, `void`, empty) mean none; GPU UUIDs
    /// cannot be mapped to device nodes without the driver, so they mean all of the node's
    /// (the step's device cgroup still decides what opens).
    pub fn from_env(getenv: impl Fn(&str) -> Option<String>) -> GpuRequest {
        let value = [
            "SLURM_STEP_GPUS",
            "CUDA_VISIBLE_DEVICES",
            "NVIDIA_VISIBLE_DEVICES",
        ]
        .iter()
        .find_map(|name| getenv(name));
        let Some(value) = value else {
            return GpuRequest::None;
        };
        let value = value.trim();
        match value {
            "" | "NoDevFiles" | "-1" | "void" | "none" => GpuRequest::None,
            "all" => GpuRequest::All,
            list => match GpuRequest::parse(list) {
                Ok(request) => request,
                Err(_) => GpuRequest::All,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(GpuRequest::parse("all"), Ok(GpuRequest::All));
        assert_eq!(GpuRequest::parse("none"), Ok(GpuRequest::None));
        assert_eq!(
            GpuRequest::parse("0, 2"),
            Ok(GpuRequest::Devices(vec![0, 2]))
        );
        assert!(matches!(GpuRequest::parse("0,x"), Err(BadGpuList(_))));
    }

    #[test]
    fn the_schedulers_variables_choose_the_gpus() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(GpuRequest::from_env(env(&[])), GpuRequest::None);
        assert_eq!(
            GpuRequest::from_env(env(&[
                ("SLURM_STEP_GPUS", "1,3"),
                ("CUDA_VISIBLE_DEVICES", "0,1")
            ])),
            GpuRequest::Devices(vec![1, 3])
        );
        assert_eq!(
            GpuRequest::from_env(env(&[("CUDA_VISIBLE_DEVICES", "2")])),
            GpuRequest::Devices(vec![2])
        );
        assert_eq!(
            GpuRequest::from_env(env(&[("CUDA_VISIBLE_DEVICES", "NoDevFiles")])),
            GpuRequest::None
        );
        assert_eq!(
            GpuRequest::from_env(env(&[("NVIDIA_VISIBLE_DEVICES", "all")])),
            GpuRequest::All
        );
        assert_eq!(
            GpuRequest::from_env(env(&[("CUDA_VISIBLE_DEVICES", "GPU-8f6c1a2e-0000")])),
            GpuRequest::All
        );
    }
}
