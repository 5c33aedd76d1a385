//! A contact sheet of the synthetic identity generator: `rows` identities
//! (one per row), `cols` images of each, as one PNG.
//!
//! `cargo run --release --example synth_sheet -- OUT.png [rows] [cols] [size] [seed]`

use gif_fr::data::synth::{image, SynthConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).ok_or("usage: synth_sheet OUT.png [rows] [cols] [size] [seed]")?;
    let num = |i: usize, d: usize| args.get(i).map_or(Ok(d), |s| s.parse::<usize>());
    let (rows, cols, size) = (num(2, 6)?, num(3, 8)?, num(4, 112)?);
    let seed = num(5, 0)? as u64;
    let cfg = SynthConfig { size, seed, ..SynthConfig::new(rows) };
    cfg.validate()?;
    let (w, h) = (cols * size, rows * size);
    let mut sheet = vec![0u8; w * h * 3];
    for r in 0..rows {
        for c in 0..cols {
            let px = image(&cfg, r as u64, c as u64);
            for y in 0..size {
                let dst = ((r * size + y) * w + c * size) * 3;
                sheet[dst..dst + size * 3].copy_from_slice(&px[y * size * 3..(y + 1) * size * 3]);
            }
        }
    }
    image::save_buffer(out, &sheet, w as u32, h as u32, image::ExtendedColorType::Rgb8)?;
    println!("wrote {out}: {rows} identities x {cols} images of {size} x {size}");
    Ok(())
}
