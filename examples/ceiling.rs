//! The floor under a broadcast's latency on this machine, for `scripts/bench ceiling`: how long
//! it takes to write one small frame to each of N loopback TCP connections and read every copy
//! back, with nothing but the sockets — no WebSocket, no JSON, no queues, no task wake-ups on
//! the writing side. Whatever fanout does per delivery comes on top of this.
//!
//! One process holds both ends (two files per connection, so at most ~9,900 connections under
//! the 20,000-file limit). `--writers` plain threads own the accepted sockets in equal slices
//! (`TCP_NODELAY`, blocking writes: a small frame into an empty send buffer never blocks).
//! One reader thread runs a current-thread tokio runtime with one task per client socket,
//! as a load generator would.
//!
//! A round: every writer writes one `--size`-byte frame to each of its sockets, the frame
//! stamped with the round's start. The reader records, per frame, start → read in an HDR
//! histogram (µs). Rounds start `--gap-ms` apart (never overlapping: a round waits for the
//! one before to be read in full). CPU time of the writer and reader threads comes from
//! `/proc/thread-self/stat` (utime + stime, in ticks of 10 ms, over all rounds).
//!
//! Prints one JSON line: connections, rounds, size, writers, frames, p50_ms/p99_ms/p999_ms/
//! max_ms (round start → frame read), write_ms_p50 (round start → last write of the round
//! issued, median over rounds), write_us_per_frame and read_us_per_frame (thread CPU per
//! frame), and cpu_us_per_frame (their sum).

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use tokio::io::AsyncReadExt as _;

#[derive(Parser)]
#[command(about = "The cost of one small write and read per loopback TCP connection")]
struct Args {
    /// Connections (both ends live in this process: at most ~9,900 under 20,000 files).
    #[arg(long, default_value_t = 9500)]
    connections: usize,
    /// Measured rounds (one frame per connection each).
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// Frame size in bytes (at least 16: a round start stamp and a round number).
    #[arg(long, default_value_t = 160)]
    size: usize,
    /// Writer threads, each owning an equal slice of the connections.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Milliseconds between round starts (at least the time a round takes).
    #[arg(long, default_value_t = 100)]
    gap_ms: u64,
}

/// utime + stime of the calling thread, in µs.
fn thread_cpu_us() -> u64 {
    let stat =
        std::fs::read_to_string("/proc/thread-self/stat").expect("read /proc/thread-self/stat");
    // Fields after the command name, which ends with the last ')': state is field 3, utime 14.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks * 10_000 // USER_HZ is 100 on Linux
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.size >= 16, "--size must be at least 16");
    anyhow::ensure!(args.writers >= 1, "--writers must be at least 1");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut servers = Vec::with_capacity(args.connections);
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        client.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        servers.push(server);
        clients.push(client);
    }

    let epoch = Instant::now();
    let frames = (args.connections * args.rounds) as u64;
    let read = Arc::new(AtomicU64::new(0));
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let reader = {
        let (read, histogram, size) = (read.clone(), histogram.clone(), args.size);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let cpu0 = thread_cpu_us();
                let mut tasks = Vec::with_capacity(clients.len());
                for client in clients {
                    let (read, histogram) = (read.clone(), histogram.clone());
                    let mut stream = tokio::net::TcpStream::from_std(client).unwrap();
                    tasks.push(tokio::spawn(async move {
                        let mut frame = vec![0u8; size];
                        while stream.read_exact(&mut frame).await.is_ok() {
                            let start = u64::from_le_bytes(frame[..8].try_into().unwrap());
                            let now = epoch.elapsed().as_micros() as u64;
                            histogram
                                .lock()
                                .unwrap()
                                .record(now.saturating_sub(start).max(1))
                                .unwrap();
                            read.fetch_add(1, Ordering::Release);
                        }
                    }));
                }
                while read.load(Ordering::Acquire) < frames {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                drop(tasks);
                thread_cpu_us() - cpu0
            })
        })
    };

    // Writers: each its slice; a barrier starts a round, the main thread paces them. Each
    // returns its CPU time and, per round, when its last write was made.
    let per = args.connections.div_ceil(args.writers);
    let mut slices = Vec::new();
    let mut sockets = servers.into_iter().peekable();
    while sockets.peek().is_some() {
        slices.push(sockets.by_ref().take(per).collect::<Vec<TcpStream>>());
    }
    let writer_count = slices.len();
    let start_round = Arc::new(Barrier::new(writer_count + 1));
    let end_round = Arc::new(Barrier::new(writer_count + 1));
    let round_start = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for mut slice in slices {
        let (start_round, end_round, round_start) =
            (start_round.clone(), end_round.clone(), round_start.clone());
        let (rounds, size) = (args.rounds, args.size);
        writers.push(std::thread::spawn(move || {
            let cpu0 = thread_cpu_us();
            let mut frame = vec![0u8; size];
            let mut done = Vec::with_capacity(rounds);
            for round in 0..rounds {
                start_round.wait();
                let start = round_start.load(Ordering::Acquire);
                frame[..8].copy_from_slice(&start.to_le_bytes());
                frame[8..16].copy_from_slice(&(round as u64).to_le_bytes());
                for socket in &mut slice {
                    socket.write_all(&frame).expect("write");
                }
                done.push(epoch.elapsed().as_micros() as u64 - start);
                end_round.wait();
            }
            (thread_cpu_us() - cpu0, done)
        }));
    }
    for round in 0..args.rounds {
        let due = Duration::from_millis(args.gap_ms * round as u64 + 200);
        if let Some(wait) = due.checked_sub(epoch.elapsed()) {
            std::thread::sleep(wait);
        }
        round_start.store(epoch.elapsed().as_micros() as u64, Ordering::Release);
        start_round.wait();
        end_round.wait();
        let want = (args.connections * (round + 1)) as u64;
        while read.load(Ordering::Acquire) < want {
            anyhow::ensure!(!reader.is_finished(), "the reader stopped early");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let (mut write_cpu, mut by_round) = (0, vec![0u64; args.rounds]);
    for writer in writers {
        let (cpu, done) = writer.join().unwrap();
        write_cpu += cpu;
        // The last write of each round: the slowest writer's.
        for (last, d) in by_round.iter_mut().zip(done) {
            *last = (*last).max(d);
        }
    }
    let read_cpu = reader.join().unwrap();
    by_round.sort_unstable();
    let h = histogram.lock().unwrap();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let per_frame = |us: u64| us as f64 / frames as f64;
    println!(
        "{}",
        serde_json::json!({
            "connections": args.connections,
            "rounds": args.rounds,
            "size": args.size,
            "writers": writer_count,
            "frames": frames,
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
            "p999_ms": ms(0.999),
            "max_ms": h.max() as f64 / 1000.0,
            "write_ms_p50": by_round[by_round.len() / 2] as f64 / 1000.0,
            "write_us_per_frame": per_frame(write_cpu),
            "read_us_per_frame": per_frame(read_cpu),
            "cpu_us_per_frame": per_frame(write_cpu + read_cpu),
        })
    );
    Ok(())
}
