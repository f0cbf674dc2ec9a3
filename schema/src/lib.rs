//! kefu's contracts, and nothing else: the J-IM wire dialect with kefu's extensions, the status
//! table, the TCP frame codec, conversation ids, the SQL migrations, placement (which node owns
//! a conversation), stored messages and the mesh protocol between nodes.
//!
//! This crate does no I/O and owns no state. Every type a client or another node can observe is
//! defined here, so a change to the contract shows up as a diff in this crate's snapshot tests.

pub mod command;
pub mod conversation;
pub mod fly_replay;
pub mod frame;
pub mod jim;
pub mod mesh;
pub mod message;
pub mod migrations;
pub mod placement;
pub mod status;

pub use command::Command;
pub use conversation::ConversationId;
pub use status::Status;
