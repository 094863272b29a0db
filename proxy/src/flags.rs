//! Envoy's response flags as a type. Metrics and access logs render them as
//! Envoy's short strings, so dashboards and log queries written for Istio work.

use std::fmt;

/// Why a request or TCP connection ended the way it did (`-` when nothing
/// went wrong).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Flags {
    #[default]
    None,
    /// No route matched (404).
    NoRoute,
    /// The cluster had no endpoint to pick (503).
    NoHealthyUpstream,
    /// Connecting to the endpoint failed (503).
    UpstreamConnectFailure,
    /// The upstream reset or closed before the response ended (503 before the head).
    UpstreamConnectionTermination,
    /// The upstream sent a response that could not be parsed (502).
    UpstreamProtocolError,
    /// The upstream sent nothing for the stream idle timeout (504).
    StreamIdleTimeout,
    /// The client went away before the response ended.
    DownstreamConnectionTermination,
    /// The client sent a malformed request (400, 431).
    DownstreamProtocolError,
    /// The route timeout (or the per-try timeout of the last try) expired (504).
    UpstreamRequestTimeout,
    /// Retries were wanted but the route's attempts were used up.
    UpstreamRetryLimitExceeded,
    /// A circuit breaker (connectionPool limit or the retry budget) was full (503).
    UpstreamOverflow,
    /// Fault injection delayed the request.
    DelayInjected,
    /// Fault injection aborted the request.
    FaultInjected,
    /// Fault injection delayed, then aborted the request (`DI,FI`).
    DelayedThenAborted,
    /// Retries used up, the last try failing to connect (`UF,URX`).
    ConnectFailureRetriesExhausted,
    /// Retries used up, the last try reset (`UC,URX`).
    TerminationRetriesExhausted,
    /// Retries used up, the last try timing out (`UT,URX`).
    TimeoutRetriesExhausted,
}

impl Flags {
    /// Envoy's string for the flag (`%RESPONSE_FLAGS%`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Flags::None => "-",
            Flags::NoRoute => "NR",
            Flags::NoHealthyUpstream => "UH",
            Flags::UpstreamConnectFailure => "UF",
            Flags::UpstreamConnectionTermination => "UC",
            Flags::UpstreamProtocolError => "UPE",
            Flags::StreamIdleTimeout => "SI",
            Flags::DownstreamConnectionTermination => "DC",
            Flags::DownstreamProtocolError => "DPE",
            Flags::UpstreamRequestTimeout => "UT",
            Flags::UpstreamRetryLimitExceeded => "URX",
            Flags::UpstreamOverflow => "UO",
            Flags::DelayInjected => "DI",
            Flags::FaultInjected => "FI",
            Flags::DelayedThenAborted => "DI,FI",
            Flags::ConnectFailureRetriesExhausted => "UF,URX",
            Flags::TerminationRetriesExhausted => "UC,URX",
            Flags::TimeoutRetriesExhausted => "UT,URX",
        }
    }

    /// The flag of a request whose retries ran out with this last outcome:
    /// Envoy adds `URX` to the outcome's own flag.
    pub const fn retries_exhausted(self) -> Flags {
        match self {
            Flags::UpstreamConnectFailure => Flags::ConnectFailureRetriesExhausted,
            Flags::UpstreamConnectionTermination => Flags::TerminationRetriesExhausted,
            Flags::UpstreamRequestTimeout => Flags::TimeoutRetriesExhausted,
            _ => Flags::UpstreamRetryLimitExceeded,
        }
    }

    pub const fn is_none(self) -> bool {
        matches!(self, Flags::None)
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Flags;

    #[test]
    fn flags_render_as_envoy_strings() {
        let all = [
            (Flags::None, "-"),
            (Flags::NoRoute, "NR"),
            (Flags::NoHealthyUpstream, "UH"),
            (Flags::UpstreamConnectFailure, "UF"),
            (Flags::UpstreamConnectionTermination, "UC"),
            (Flags::UpstreamProtocolError, "UPE"),
            (Flags::StreamIdleTimeout, "SI"),
            (Flags::DownstreamConnectionTermination, "DC"),
            (Flags::DownstreamProtocolError, "DPE"),
            (Flags::UpstreamRequestTimeout, "UT"),
            (Flags::UpstreamRetryLimitExceeded, "URX"),
            (Flags::UpstreamOverflow, "UO"),
            (Flags::DelayInjected, "DI"),
            (Flags::FaultInjected, "FI"),
            (Flags::DelayedThenAborted, "DI,FI"),
            (Flags::ConnectFailureRetriesExhausted, "UF,URX"),
            (Flags::TerminationRetriesExhausted, "UC,URX"),
            (Flags::TimeoutRetriesExhausted, "UT,URX"),
        ];
        for (f, s) in all {
            assert_eq!(f.to_string(), s);
        }
    }
}
