//! SQL migrations, embedded in every binary that links this crate and applied in order at start.
//! A migration is never edited after it lands; a change is a new file.

/// One migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version, from the file name's number.
    pub version: u32,
    /// Name, from the file name.
    pub name: &'static str,
    /// The SQL, possibly several statements.
    pub sql: &'static str,
}

/// Every migration, in version order.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "init", sql: include_str!("../migrations/0001_init.sql") },
    Migration { version: 2, name: "mesh", sql: include_str!("../migrations/0002_mesh.sql") },
    Migration { version: 3, name: "client_id_per_conversation", sql: include_str!("../migrations/0003_client_id_per_conversation.sql") },
    Migration { version: 4, name: "accounts", sql: include_str!("../migrations/0004_accounts.sql") },
    Migration { version: 5, name: "group_access", sql: include_str!("../migrations/0005_group_access.sql") },
    Migration { version: 6, name: "records", sql: include_str!("../migrations/0006_records.sql") },
    Migration { version: 7, name: "webhook_outbox", sql: include_str!("../migrations/0007_webhook_outbox.sql") },
];

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    #[test]
    fn versions_increase_from_one() {
        for (i, m) in super::MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
        }
    }
}
