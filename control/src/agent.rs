//! Host side of the guest agent: the mux over the virtio-serial port.
