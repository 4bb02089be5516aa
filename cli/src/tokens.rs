//! `muster token`: join tokens that let new machines enroll.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use clap::Subcommand;
use muster_cli::client::Admin;
use muster_proto::pb;

use crate::output::{render, Output};
use crate::views::{tokens_table, TokenView};
use crate::{parse_label_arg, Ctx};

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a join token; prints only the token, so `T=$(muster token create)` works.
    Create {
        /// How long it stays valid (e.g. 30m, 1h, 7d) [default: 1h; 30d with --boot]
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// How many machines may enroll with it [default: 1; 1000 with --boot]
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        uses: Option<u32>,
        /// A boot token, to put in network-boot scripts (readable by anyone on the LAN): its
        /// machines always land `pending`, except ones pre-registered with `muster machine register`.
        #[arg(long, conflicts_with = "pending")]
        boot: bool,
        /// A label for machines enrolled with it (key=value). Repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
        labels: Vec<(String, String)>,
        /// Machines enrolled with it wait as `pending` until `muster approve`.
        #[arg(long)]
        pending: bool,
        /// A note shown in `muster token list`.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List join tokens (never their secrets).
    List {
        /// Output format: a table for people, json or yaml for scripts.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a join token by its id: no more machines can enroll with it.
    Revoke {
        /// The token id (the part before the dot; see `muster token list`).
        id: String,
    },
}

pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(366 * 24 * 3600) {
        return Err("must be between 1s and 366d".into());
    }
    Ok(d)
}

impl TokenCmd {
    pub async fn run(self, ctx: &Ctx) -> Result<()> {
        let mut a: Admin = ctx.admin().await?;
        match self {
            TokenCmd::Create { ttl, uses, labels, pending, description, boot } => {
                let r = a
                    .client
                    .create_token(pb::CreateTokenRequest {
                        ttl_ms: ttl.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                        uses: uses.unwrap_or(0),
                        labels: labels.into_iter().collect(),
                        pending,
                        description,
                        boot,
                    })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!("{}", r.token);
            }
            TokenCmd::List { output } => {
                let tokens = a
                    .client
                    .list_tokens(pb::ListTokensRequest {})
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner()
                    .tokens;
                match output {
                    Output::Table if tokens.is_empty() => {
                        eprintln!("no join tokens (create one with `muster token create`)")
                    }
                    Output::Table => out!("{}", tokens_table(&tokens, SystemTime::now())),
                    o => out!("{}", render(&tokens.iter().map(TokenView::new).collect::<Vec<_>>(), o)?),
                }
            }
            TokenCmd::Revoke { id } => {
                let t = a
                    .client
                    .revoke_token(pb::RevokeTokenRequest { id })
                    .await
                    .map_err(|s| a.explain(s))?
                    .into_inner();
                outln!("token {} revoked", t.id);
            }
        }
        Ok(())
    }
}
