//! The enilab guest agent's wire protocol, shared with the host side.
