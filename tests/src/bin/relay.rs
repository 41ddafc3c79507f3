//! A TCP relay that adds delay: the link delay this host's kernel cannot add
//! (no `netem`), in user space.
//!
//! ```text
//! relay --listen 127.0.0.1:5555 --to 10.77.0.2:4444 [--delay-ms 10]
//! ```
//!
//! Every connection accepted on `--listen` is joined to a new connection to
//! `--to`; each direction holds every chunk it reads for `--delay-ms`
//! before it writes it on (so the round trip grows by twice the delay), in
//! order, with at most 32 chunks of 64 KiB (2 MiB) in flight per direction:
//! about what a 1 Gbit/s link holds over 10 ms, so that the relay adds
//! delay and not a queue of its own (the reader then waits; a slow side
//! slows the other, as on a link). A side
//! that closes or fails ends that connection. Runs until killed; started
//! by the benchmarks (bench/twohosts.py) inside the source's network
//! namespace, so the source migrates to the relay and the relay to the
//! destination across the veth pair.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 << 10;
const IN_FLIGHT: usize = 32;

fn usage() -> ! {
    eprintln!("usage: relay --listen ADDR --to ADDR [--delay-ms N]");
    std::process::exit(2)
}

/// Copy `from` to `to`, each chunk held `delay` after it was read.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let mut out = match to.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let writer = std::thread::spawn(move || {
        for (at, buf) in rx {
            let due = at + delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if out.write_all(&buf).is_err() {
                break;
            }
        }
        let _ = out.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Read);
    let _ = to.flush();
}

fn main() {
    let mut listen = None;
    let mut to = None;
    let mut delay_ms = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next(),
            "--to" => to = args.next(),
            "--delay-ms" => {
                delay_ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            _ => usage(),
        }
    }
    let (Some(listen), Some(to)) = (listen, to) else {
        usage()
    };
    let delay = Duration::from_millis(delay_ms);
    let l = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("relay: cannot listen on {listen}: {e}");
        std::process::exit(1)
    });
    eprintln!("relay: {listen} -> {to}, {delay_ms} ms each way");
    for c in l.incoming() {
        let Ok(a) = c else { continue };
        let b = match TcpStream::connect(&to) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("relay: cannot connect to {to}: {e}");
                continue;
            }
        };
        let _ = a.set_nodelay(true);
        let _ = b.set_nodelay(true);
        let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
            continue;
        };
        std::thread::spawn(move || pump(a, b, delay));
        std::thread::spawn(move || pump(b2, a2, delay));
    }
}
