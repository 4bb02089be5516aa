//! Listing the fleet, a page at a time (the controller pages `ListMachines`).

use muster_proto::pb;
use muster_proto::pb::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

/// Every machine, fetched page by page (without inventories: `GetMachine` has them).
pub async fn all_machines(
    client: &mut AdminServiceClient<Channel>,
) -> Result<Vec<pb::Machine>, tonic::Status> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let r =
            client.list_machines(pb::ListMachinesRequest { page_size: 0, page_token }).await?.into_inner();
        out.extend(r.machines);
        if r.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = r.next_page_token;
    }
}
