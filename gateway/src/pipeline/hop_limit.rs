//! `hop_limit`: counts the gateways a request passed (`x-cacheroute-hops`) and
//! refuses a loop (508) past `[gateway] max_hops`; tells the next hop its count.

use super::{Flow, Incoming, Phases, RequestCtx, RequestFilter, World};
use crate::headers;
use cacheroute_decisions::openai::ApiError;

pub struct HopLimit;

impl RequestFilter for HopLimit {
    fn name(&self) -> &str {
        "hop_limit"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn on_request(&self, ctx: &mut RequestCtx, req: &mut Incoming<'_>, _: &dyn World) -> Flow {
        let hops = req
            .header_str(headers::HOPS)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        let max = ctx.fleet.config.gateway.max_hops;
        if hops >= max {
            return Flow::Reply(ApiError::loop_detected(hops, max).into());
        }
        ctx.hops = hops;
        ctx.request_headers
            .push((headers::HOPS, (hops + 1).to_string()));
        Flow::Next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fake::FakeWorld;
    use crate::pipeline::testing::{ctx_with, request};

    #[tokio::test]
    async fn counts_a_hop_and_refuses_a_loop() {
        let (mut ctx, mut body) = ctx_with("").await;
        let header = request(&[(headers::HOPS, "1")]);
        let mut req = Incoming {
            header: &header,
            body: &mut body,
        };
        assert!(matches!(
            HopLimit.on_request(&mut ctx, &mut req, &FakeWorld::default()),
            Flow::Next
        ));
        assert_eq!(ctx.hops, 1);
        assert_eq!(ctx.request_headers, [(headers::HOPS, "2".to_string())]);
        let header = request(&[(headers::HOPS, "4")]);
        let mut req = Incoming {
            header: &header,
            body: &mut body,
        };
        match HopLimit.on_request(&mut ctx, &mut req, &FakeWorld::default()) {
            Flow::Reply(r) => assert_eq!(r.error.status, 508),
            _ => panic!("a fourth hop passed"),
        }
    }
}
