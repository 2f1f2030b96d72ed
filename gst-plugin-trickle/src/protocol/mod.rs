// SPDX-License-Identifier: MPL-2.0
//! The trickle protocol (../shared/trickle-protocol.md): server and client. (being written)
