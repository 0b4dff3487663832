//! `etlmesh token new NAME`: a new API token for the gateway, and the entry of
//! `platform.access.tokens` that lets it in (its SHA-256, never the token itself).
//! `etlmesh token join`: a join token for the mesh with an expiry and a number of uses;
//! `etlmesh token revoke SERIAL`: a mesh certificate no process of the mesh accepts.

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
    /// Mint a join token for the mesh: it expires, and allows so many joins. Written to
    /// the control plane's state directory, which it reads at each join.
    Join {
        /// What it is for (in the control plane's log when it is used).
        #[arg(long, default_value = "minted")]
        name: String,
        /// How long it is accepted.
        #[arg(long, default_value = "1h", value_parser = crate::mesh::duration)]
        ttl: std::time::Duration,
        /// Joins it allows (0: any number until it expires).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The control plane's state directory.
        #[arg(long, env = "ETLMESH_STATE_DIR", default_value = ".etlmesh")]
        state_dir: std::path::PathBuf,
        /// The trust anchor, when the pipeline file gives one (`platform.mesh.ca.cert`).
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
    },
    /// Revoke a mesh certificate by its serial number (hex, as the control plane logs it
    /// when it issues one): the control plane refuses it within a second, workers and
    /// gateways with their next heartbeat or report, and it cannot be renewed.
    Revoke {
        /// The serial number.
        serial: String,
        /// The control plane's state directory.
        #[arg(long, env = "ETLMESH_STATE_DIR", default_value = ".etlmesh")]
        state_dir: std::path::PathBuf,
    },
}

/// The hex SHA-256 of a token, as the file holds it.
pub(crate) fn hash(token: &str) -> String {
    etlmesh_tls::hex(&etlmesh_tls::sha256(token.as_bytes()))
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
                .map_err(|_| CliError::Random)?;
            let token = format!("etm_{}", etlmesh_tls::hex(&bytes));
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
        TokenCommand::Join {
            name,
            ttl,
            uses,
            state_dir,
            ca,
        } => {
            let dir = state_dir.join("mesh");
            let token = etlmesh_tls::Authority::mint_in(
                &dir,
                ca.as_deref(),
                name,
                *ttl,
                (*uses > 0).then_some(*uses),
            )
            .map_err(CliError::from)?;
            println!("{token}");
            eprintln!(
                "join token `{name}`: {} for {}s (give it as ETLMESH_JOIN_TOKEN; the control plane keeps only its digest)",
                if *uses > 0 {
                    format!("{uses} join(s)")
                } else {
                    "any number of joins".to_string()
                },
                ttl.as_secs()
            );
            Ok(())
        }
        TokenCommand::Revoke { serial, state_dir } => {
            etlmesh_tls::grants::Revocations::in_dir(&state_dir.join("mesh"))
                .revoke(serial)
                .map_err(CliError::from)?;
            eprintln!("certificate {serial} revoked");
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
