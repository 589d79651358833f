//! One module per subcommand, plus the flags and signal handling they share.

pub mod bench;
pub mod close;
pub mod devices;
pub mod etcd;
pub mod join;
pub mod launch;
pub mod membership;
pub mod rdzv_args;
pub mod run;
pub mod signals;
pub mod status;
pub mod summary;
pub mod workers;
