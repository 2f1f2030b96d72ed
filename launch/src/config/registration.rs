// SPDX-License-Identifier: MPL-2.0
//! The registration settings (docs/live-runner.md), read with the rest of the configuration.

use super::ConfigError;
use serde::Serialize;

/// `price_info`: a positive decimal in USD per `unit` (`hour`, `720p` or `fixed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceInfo {
    /// A JSON number, written as given (`3.5`).
    pub price: serde_json::Number,
    pub currency: String,
    pub unit: String,
}

/// Registration settings (`RIVULET_ORCHESTRATOR` and friends; README, "Registering with an
/// orchestrator"). The secret is never printed: `Debug` leaves it out.
#[derive(Clone, Default)]
pub struct Settings {
    /// `RIVULET_ORCHESTRATOR` / `--orchestrator`: the orchestrator's runner-facing base URL.
    pub orchestrator: Option<String>,
    /// `RIVULET_ORCH_SECRET`, or the first line of the file `RIVULET_ORCH_SECRET_FILE`.
    pub secret: Option<String>,
    /// `RIVULET_RUNNER_URL` / `--runner-url`: where the orchestrator reaches this daemon.
    pub runner_url: Option<String>,
    /// `RIVULET_RUNNER_ID`: the runner id proposed at the first bootstrap.
    pub runner_id: Option<String>,
    /// `RIVULET_RUNNER_APP`: the advertised app (default `live-video-to-video/<MODEL_ID>`).
    pub app: Option<String>,
    /// `RIVULET_RUNNER_PRICE` (decimal, USD) and `RIVULET_RUNNER_PRICE_UNIT` (`hour`).
    pub price: Option<PriceInfo>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("orchestrator", &self.orchestrator)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("runner_url", &self.runner_url)
            .field("runner_id", &self.runner_id)
            .field("app", &self.app)
            .field("price", &self.price)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl Settings {
    pub fn from_env() -> Result<Settings, ConfigError> {
        let secret = match env("RIVULET_ORCH_SECRET") {
            Some(s) => Some(s),
            None => match env("RIVULET_ORCH_SECRET_FILE") {
                None => None,
                Some(path) => {
                    let text =
                        std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
                            name: "RIVULET_ORCH_SECRET_FILE",
                            value: path.clone(),
                            reason: format!("cannot read it: {e}"),
                        })?;
                    text.lines()
                        .next()
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty())
                }
            },
        };
        let price = match env("RIVULET_RUNNER_PRICE") {
            None => None,
            Some(p) => Some(parse_price(
                &p,
                env("RIVULET_RUNNER_PRICE_UNIT").as_deref(),
            )?),
        };
        Ok(Settings {
            orchestrator: env("RIVULET_ORCHESTRATOR"),
            secret,
            runner_url: env("RIVULET_RUNNER_URL"),
            runner_id: env("RIVULET_RUNNER_ID"),
            app: env("RIVULET_RUNNER_APP"),
            price,
        })
    }
}

/// `price_info` from `RIVULET_RUNNER_PRICE` (a positive decimal, USD) and
/// `RIVULET_RUNNER_PRICE_UNIT` (`hour` by default, `720p`, `fixed`).
pub(crate) fn parse_price(price: &str, unit: Option<&str>) -> Result<PriceInfo, ConfigError> {
    let number = price
        .parse::<serde_json::Number>()
        .ok()
        .filter(|n| n.as_f64().is_some_and(|f| f > 0.0))
        .ok_or_else(|| ConfigError::Invalid {
            name: "RIVULET_RUNNER_PRICE",
            value: price.to_string(),
            reason: "expected a positive decimal (USD)".into(),
        })?;
    let unit = unit.unwrap_or("hour");
    if !matches!(unit, "hour" | "720p" | "fixed") {
        return Err(ConfigError::Invalid {
            name: "RIVULET_RUNNER_PRICE_UNIT",
            value: unit.to_string(),
            reason: "expected hour, 720p or fixed".into(),
        });
    }
    Ok(PriceInfo {
        price: number,
        currency: "usd".into(),
        unit: unit.to_string(),
    })
}
