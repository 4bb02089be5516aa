//! Certificate time: when a machine certificate is valid, and when to renew it (at ~70 % of its
//! lifetime, a little earlier by jitter so machines enrolled together spread their renewals).

pub(crate) use muster_util::now_ms as now_unix_ms;

/// A certificate's validity in Unix seconds.
pub fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    let (_, p) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let (_, c) = x509_parser::parse_x509_certificate(&p.contents).ok()?;
    Some((c.validity().not_before.timestamp(), c.validity().not_after.timestamp()))
}

/// When to renew a certificate valid from `nb` to `na` (Unix seconds): at 70 % of its lifetime,
/// never earlier than one second from `now`.
pub fn renew_at(nb: i64, na: i64, now: i64) -> i64 {
    renew_at_jittered(nb, na, now, 0.0)
}

/// [`renew_at`], moved earlier by `jitter` (0..1) times 5 % of the lifetime, so that machines
/// enrolled together do not all renew in the same second. Never earlier than one second from
/// `now`.
pub fn renew_at_jittered(nb: i64, na: i64, now: i64, jitter: f64) -> i64 {
    let life = (na - nb).max(0);
    let early = (life as f64 * 0.05 * jitter.clamp(0.0, 1.0)) as i64;
    (nb + life * 7 / 10 - early).max(now + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_seventy_percent_never_in_the_past() {
        assert_eq!(renew_at(0, 1000, 0), 700);
        assert_eq!(renew_at(1000, 87_400, 1000), 1000 + 86_400 * 7 / 10);
        assert_eq!(renew_at(0, 1000, 900), 901, "overdue: renew now");
        assert_eq!(renew_at(0, 0, 50), 51, "no lifetime: renew now");
    }

    #[test]
    fn renewal_jitter_only_moves_it_a_little_earlier() {
        assert_eq!(renew_at_jittered(0, 1000, 0, 1.0), 650);
        assert_eq!(renew_at_jittered(0, 1000, 0, 0.5), 675);
        assert_eq!(renew_at_jittered(0, 1000, 0, 7.0), 650, "clamped");
        assert_eq!(renew_at_jittered(0, 1000, 0, -1.0), 700, "clamped");
        assert_eq!(renew_at_jittered(0, 1000, 680, 1.0), 681, "never in the past");
        for _ in 0..100 {
            let at = renew_at_jittered(0, 86_400, 0, crate::backoff::random_fraction());
            assert!((86_400 * 65 / 100..=86_400 * 7 / 10).contains(&at), "{at}");
        }
    }
}
