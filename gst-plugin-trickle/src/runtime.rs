// SPDX-License-Identifier: MPL-2.0
//! The shared tokio runtime of the trickle elements. (being written)
