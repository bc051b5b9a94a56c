//! QEMU instances: command line, QMP, accelerator probe, hot-plug.
