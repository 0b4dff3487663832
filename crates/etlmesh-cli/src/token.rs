//! `etlmesh token new NAME`: a new API token for the gateway, and the entry of
//! `platform.access.tokens` that lets it in (its SHA-256, never the token itself).

use ring::rand::SecureRandom;

use crate::CliError;

/// `etlmesh token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

/// What to do with tokens.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token: prints it once, and the file entry to add.
    New {
        /// Who holds it (shown in logs and metrics).
        name: String,
        /// Pipelines it may use (`*`: all).
        #[arg(long, value_delimiter = ',', default_value = "*")]
        pipelines: Vec<String>,
        /// Requests per second on average (0: no limit).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// It may not run analytics queries.
        #[arg(long)]
        no_query: bool,
        /// It may not submit or see batch jobs.
        #[arg(long)]
        no_jobs: bool,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hex SHA-256 of a token, as the file holds it.
pub(crate) fn hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// The `platform.access.tokens` entry for a token.
fn entry(
    name: &str,
    token: &str,
    pipelines: &[String],
    rate: f64,
    query: bool,
    jobs: bool,
) -> String {
    let list = pipelines
        .iter()
        .map(|p| {
            if p == "*" {
                "'*'".to_string()
            } else {
                p.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut e = format!(
        "      - {{ name: {name}, sha256: {}, pipelines: [{list}]",
        hash(token)
    );
    if rate > 0.0 {
        e.push_str(&format!(", rate: {rate}"));
    }
    if !query {
        e.push_str(", query: false");
    }
    if !jobs {
        e.push_str(", jobs: false");
    }
    e.push_str(" }");
    e
}

pub(crate) fn token(args: &TokenArgs) -> Result<(), CliError> {
    match &args.command {
        TokenCommand::New {
            name,
            pipelines,
            rate,
            no_query,
            no_jobs,
        } => {
            let mut bytes = [0u8; 24];
            ring::rand::SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| CliError::Other("the system's random source failed".into()))?;
            let token = format!("etm_{}", hex(&bytes));
            println!("{token}");
            eprintln!(
                "the token (shown once; give it to {name}, e.g. as ETLMESH_TOKEN) is above. Add this to the pipeline file:"
            );
            eprintln!("platform:\n  access:\n    tokens:");
            eprintln!(
                "{}",
                entry(name, &token, pipelines, *rate, !no_query, !no_jobs)
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_entries() {
        assert_eq!(
            hash("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(
            entry("ci", "test", &["clean".into()], 5.0, true, false),
            "      - { name: ci, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, pipelines: [clean], rate: 5, jobs: false }"
        );
    }
}
