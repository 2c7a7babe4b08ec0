//! `cargo run --release -p ssh-chachapoly --example speed`: sealing and
//! opening chacha20-poly1305@openssh.com packets with ring and with this
//! crate, side by side, at interactive and bulk packet sizes.

use ring::aead::chacha20_poly1305_openssh as ring_openssh;
use ssh_chachapoly::{OpeningKey, SealingKey, TAG_LEN};
use std::time::Instant;

const BYTES_PER_CASE: usize = 512 << 20;

fn rate(payload: usize, mut run: impl FnMut(u32)) -> f64 {
    let packets = (BYTES_PER_CASE / payload).max(1);
    run(0); // warm up
    let start = Instant::now();
    for seq in 0..packets {
        run(seq as u32);
    }
    (packets * payload) as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let key = [0x5a; 64];
    println!("payload   seal MB/s: ring    ours  ratio    open MB/s: ring    ours  ratio");
    for payload in [36usize, 100, 1024, 2048, 4096, 8192, 32768] {
        let mut packet = vec![0x17u8; 4 + payload];
        let mut tag = [0; TAG_LEN];
        let ring_seal = ring_openssh::SealingKey::new(&key);
        let ours_seal = SealingKey::new(&key);
        let seal_ring = rate(payload, |seq| {
            ring_seal.seal_in_place(seq, &mut packet, &mut tag)
        });
        let seal_ours = rate(payload, |seq| {
            ours_seal.seal_in_place(seq, &mut packet, &mut tag)
        });

        // Open one sealed packet over and over (the tag check runs in full
        // each time; the decryption is undone by sealing nothing again).
        let seq = 9;
        ours_seal.seal_in_place(seq, &mut packet, &mut tag);
        let sealed = packet.clone();
        let ring_open = ring_openssh::OpeningKey::new(&key);
        let ours_open = OpeningKey::new(&key);
        let open_ring = rate(payload, |_| {
            packet.copy_from_slice(&sealed);
            ring_open
                .open_in_place(seq, &mut packet, &tag)
                .expect("authentic");
        });
        let open_ours = rate(payload, |_| {
            packet.copy_from_slice(&sealed);
            ours_open
                .open_in_place(seq, &mut packet, &tag)
                .expect("authentic");
        });
        println!(
            "{payload:7}        {seal_ring:7.0} {seal_ours:7.0} {:6.2}        {open_ring:7.0} {open_ours:7.0} {:6.2}",
            seal_ours / seal_ring,
            open_ours / open_ring
        );
    }
}
