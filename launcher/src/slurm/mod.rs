//! What Slurm hands ferry: srun's own command line, the step's variables (and what
//! frameworks derive from them), the job's state and the site's plugin settings.

pub mod forward;
pub mod framework_env;
pub mod job_state;
pub mod site;
pub mod srun_args;
