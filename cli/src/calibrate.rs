//! `cacheroute calibrate`: fit the TTFT cost model to a GPU profile and say
//! how well it fits, before trusting it for decisions.

use anyhow::{Context, Result};
use cacheroute_decisions::cost_model::{builtin_profile, CalibrationProfile, CostModel};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum CalibrateCommand {
    /// Fit the cost model to PROFILE (a JSON file in the format of conf/profiles/,
    /// or a shipped profile's short name such as rtx5090x8-llama3-70b) and print the
    /// fitted coefficients and each curve's error (MAPE), in-sample and on held-out
    /// points (leave-one-out).
    Fit {
        profile: PathBuf,
        /// Print the fitted model and the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: CalibrateCommand) -> Result<()> {
    match cmd {
        CalibrateCommand::Fit { profile, json } => print!("{}", fit_report(&profile, json)?),
    }
    Ok(())
}

fn fit_report(path: &Path, json: bool) -> Result<String> {
    let text = match path.to_str().and_then(builtin_profile) {
        Some(json) => json.to_string(),
        None => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read profile {}", path.display()))?,
    };
    let profile = CalibrationProfile::from_json(&text)
        .with_context(|| format!("profile {}", path.display()))?;
    let report =
        CostModel::evaluate(&profile).with_context(|| format!("fitting {}", path.display()))?;
    if json {
        return Ok(serde_json::to_string_pretty(&report)? + "\n");
    }
    let m = &report.model;
    Ok(format!(
        "profile        {} ({}, model {})\n\
         fitted model (ms):\n\
         \x20 prefill(n)            = max({:.3}, {:.3} + {:.6}·n + {:.3e}·n²/2)\n\
         \x20 cached_prefill(p, s)  = max({:.3}, {:.3} + {:.6}·s + {:.3e}·s²/2 + {:.3e}·p·s)\n\
         \x20 decode_step(b, c)     = {:.3} + {:.4}·b + {:.3e}·b·c\n\
         \x20 h2d(bytes)            = bytes / {:.1} GB/s\n\
         \x20 kv bytes per token    = {}\n\n{}",
        path.display(),
        profile.device,
        profile.model,
        m.prefill_floor_ms,
        m.prefill_intercept_ms,
        m.prefill_ms_per_token,
        m.prefill_ms_per_pair,
        m.cached_floor_ms,
        m.prefill_intercept_ms,
        m.prefill_ms_per_token,
        m.prefill_ms_per_pair,
        m.cached_ms_per_context_pair,
        m.decode_intercept_ms,
        m.decode_ms_per_seq,
        m.decode_ms_per_context_token,
        m.h2d_gbps,
        m.kv_bytes_per_token,
        report
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../conf/profiles")
            .join(name)
    }

    #[test]
    fn fits_the_shipped_profiles() {
        for (short, _) in cacheroute_decisions::cost_model::BUILTIN_PROFILES {
            let name = &format!("{short}.json");
            // by path and by short name alike
            let text = fit_report(&profile(name), false).unwrap();
            assert_eq!(
                text.lines().skip(1).collect::<Vec<_>>(),
                fit_report(Path::new(short), false)
                    .unwrap()
                    .lines()
                    .skip(1)
                    .collect::<Vec<_>>()
            );
            for curve in ["prefill", "cached_prefill", "decode", "h2d", "LOO MAPE"] {
                assert!(text.contains(curve), "{name}: no {curve} in\n{text}");
            }
            let json: serde_json::Value =
                serde_json::from_str(&fit_report(&profile(name), true).unwrap()).unwrap();
            assert!(json["model"]["h2d_gbps"].as_f64().unwrap() > 10.0);
        }
    }

    #[test]
    fn bad_profiles_are_refused_with_the_file_named() {
        let dir = std::env::temp_dir().join(format!("cr-calibrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{\"prefill_b1_ms\": {\"x\": 1}}").unwrap();
        let err = format!("{:#}", fit_report(&bad, false).unwrap_err());
        assert!(err.contains("bad.json"), "{err}");
        let missing = format!(
            "{:#}",
            fit_report(&dir.join("none.json"), false).unwrap_err()
        );
        assert!(missing.contains("cannot read profile"), "{missing}");
    }
}
