//! `handshake`: to be written (issue 2).
