//! The XDP gate on the uplink (issue 3). Placeholder until it lands.
