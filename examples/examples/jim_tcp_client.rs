//! A minimal J-IM binary TCP client: logs in, joins a group, then sends each line you type.
//! Lines starting with `@user ` go privately to that user, others to the group. Every frame the
//! server sends is printed as it arrives.
//!
//! ```text
//! cargo run --release -p node &            # a node on 127.0.0.1:8888
//! cargo run -p examples --example jim_tcp_client -- 127.0.0.1:8888 alice secret 100
//! ```

use std::net::SocketAddr;

use serde_json::json;
use tests::{Client, TcpClient};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().unwrap_or_else(|| "127.0.0.1:8888".into()).parse()?;
    let user = args.next().unwrap_or_else(|| "alice".into());
    let password = args.next().unwrap_or_else(|| "123".into());
    let group = args.next().unwrap_or_else(|| "100".into());

    let mut client = TcpClient::connect(addr).await?;
    let reply = client.login(&user, &password).await?;
    println!("logged in: {reply}");
    client.send(json!({"cmd": 7, "groupId": group})).await?;
    client.send(json!({"cmd": 19, "type": 0, "userId": user})).await?;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let body = match line.strip_prefix('@').and_then(|rest| rest.split_once(' ')) {
                    Some((to, text)) => json!({"cmd": 11, "chatType": 2, "to": to, "content": text}),
                    None => json!({"cmd": 11, "chatType": 1, "groupId": group, "content": line}),
                };
                client.send(body).await?;
            }
            frame = client.recv_wire() => match frame {
                Ok(v) => println!("<- {v}"),
                Err(e) if e.to_string().contains("timed out") => continue,
                Err(e) => return Err(e),
            },
        }
    }
    client.send(json!({"cmd": 14})).await?;
    Ok(())
}
