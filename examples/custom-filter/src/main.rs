//! Runs a CacheRoute gateway with the `content_check` filter:
//! `custom-filter --config cacheroute.toml` or `custom-filter --upstream URL`.

use cacheroute_gateway::Gateway;
use custom_filter::ContentCheck;

fn main() -> anyhow_free::Result {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut builder = Gateway::builder().add_filter(ContentCheck::new(&["password"]));
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        builder = match flag.as_str() {
            "--config" => builder.config_file(value),
            "--upstream" => builder.upstream(value),
            "--listen" => builder.listen(value.parse().map_err(|e| format!("--listen: {e}"))?),
            other => return Err(format!("unknown flag {other}").into()),
        };
    }
    builder.run().map_err(|e| format!("{e:#}").into())
}

/// `main`'s error: a message, printed by the standard library's `Termination`.
mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}
