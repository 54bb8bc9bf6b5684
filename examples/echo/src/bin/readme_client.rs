//! The README's client snippet as a program (the lines between the README
//! markers are the README's text, checked by `tests/readme.rs`, which also
//! runs this against a real etcd and real servers). `ETCD_ENDPOINTS` says
//! where etcd is; it makes one `Say` call and prints who answered.

mod pb {
    tonic::include_proto!("echo");
}
use pb::echo_client::EchoClient;
use pb::Message;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // README:begin client
    use etcd_lb::{
        BalancerConfig, CancellationToken, DiscoveryConfig, EtcdConfig, RetryPolicy, ServiceName,
    };
    use std::time::Duration;

    let etcd = EtcdConfig::plain(std::env::var("ETCD_ENDPOINTS")?.split(','));
    let (balancer, discovery) = etcd_lb::connect(
        etcd,
        DiscoveryConfig::new(ServiceName::new("echo")?),
        BalancerConfig {
            retry: RetryPolicy::idempotent(["/echo.Echo/Say"]),
            ..Default::default()
        },
        CancellationToken::new(),
    );
    discovery.wait_synced(Duration::from_secs(5)).await?; // or says why not: etcd not reached, ...
    let mut client = EchoClient::new(balancer); // any generated tonic client; streaming works too
    let reply = client.say(Message { text: "hi".into() }).await?;
    println!("{} answered", reply.get_ref().server);
    // README:end client
    Ok(())
}
