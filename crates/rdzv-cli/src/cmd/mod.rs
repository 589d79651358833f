//! One module per subcommand.

pub mod etcd;
