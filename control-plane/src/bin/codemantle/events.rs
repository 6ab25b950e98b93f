//! `codemantle events [--after N] [--limit N] [-f]`: a page of the event log, or follow it
//! live over SSE (reconnecting with `Last-Event-ID`, so nothing is missed or repeated).

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::api::{Api, CliError};
use crate::output::{Output, table, text, when};

#[derive(Args)]
pub struct EventsArgs {
    /// Events after this sequence number (default: the most recent ones).
    #[arg(long)]
    after: Option<u64>,
    /// How many events (1..1000).
    #[arg(long, default_value_t = 50)]
    limit: u64,
    /// Keep running and print new events as they happen.
    #[arg(short = 'f', long)]
    follow: bool,
}

pub async fn run(api: &Api, out: &Output, args: EventsArgs) -> Result<(), CliError> {
    let path = match args.after {
        Some(after) => format!("/events?after={after}&limit={}", args.limit),
        None => format!("/events?limit={}", args.limit),
    };
    let page = api.get(&path).await?;
    let events = page["events"].as_array().cloned().unwrap_or_default();
    if args.follow {
        for e in &events {
            print_line(out, e);
        }
        let last = page["last_seq"].as_u64().or(args.after).unwrap_or(0);
        return follow(api, out, last).await;
    }
    if out.json {
        out.print_json(&page);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = events.iter().map(row).collect();
    print!(
        "{}",
        table(&["SEQ", "TIME", "ACTOR", "KIND", "DETAIL"], &rows)
    );
    Ok(())
}

fn row(e: &Value) -> Vec<String> {
    vec![
        text(&e["seq"]),
        when(&e["ts_ms"]),
        text(&e["actor"]),
        text(&e["kind"]),
        e["detail"].to_string(),
    ]
}

fn print_line(out: &Output, e: &Value) {
    if out.json {
        println!("{e}");
    } else {
        println!("{}", row(e).join("  "));
    }
}

async fn follow(api: &Api, out: &Output, mut last: u64) -> Result<(), CliError> {
    let mut backoff = Duration::from_secs(1);
    loop {
        let stream = api
            .open_stream(
                &format!("/events/stream?after={last}"),
                &[("last-event-id", last.to_string())],
            )
            .await;
        let stream = match stream {
            Ok(s) => s,
            Err(e @ CliError::Api { .. }) => return Err(e),
            Err(e) => {
                eprintln!("codemantle: {e}; reconnecting in {} s", backoff.as_secs());
                smol::Timer::after(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_secs(1);
        let mut sse = stream.into_sse();
        loop {
            match sse.next_event().await {
                Ok(Some(ev)) => {
                    let Ok(event) = serde_json::from_str::<Value>(&ev.data) else {
                        continue;
                    };
                    if let Some(seq) = event["seq"].as_u64() {
                        if seq <= last {
                            continue;
                        }
                        last = seq;
                    }
                    print_line(out, &event);
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("codemantle: event stream interrupted ({e}); resuming after {last}");
                    break;
                }
            }
        }
        smol::Timer::after(Duration::from_millis(500)).await;
    }
}
