//! A PNG of a replay's timeline: four stacked panels (unclaimed tasks,
//! running tasks, VMs, replicas) over time, each labelled with its name and
//! peak. Self-contained: a 3x5 pixel font, no system fonts needed.

use std::path::Path;

use super::{Sample, SimResult};

const W: usize = 1200;
const PANEL_H: usize = 120;
const PAD: usize = 12;
const BG: [u8; 3] = [255, 255, 255];
const AXIS: [u8; 3] = [160, 160, 160];
const TEXT: [u8; 3] = [30, 30, 30];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: BG.repeat(w * h),
        }
    }
    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.w && y < self.h {
            let i = (y * self.w + x) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn vline(&mut self, x: usize, y0: usize, y1: usize, c: [u8; 3]) {
        for y in y0.min(y1)..=y0.max(y1) {
            self.set(x, y, c);
        }
    }
    fn hline(&mut self, x0: usize, x1: usize, y: usize, c: [u8; 3]) {
        for x in x0..=x1 {
            self.set(x, y, c);
        }
    }
    /// Text in the 3x5 font, scaled 2x.
    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..2 {
                            for dx in 0..2 {
                                self.set(x + i * 8 + col * 2 + dx, y + row * 2 + dy, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// 3x5 glyphs (rows top to bottom, 3 bits each) for what the labels use.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'C' => [7, 4, 4, 4, 7],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'G' => [7, 4, 5, 5, 7],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [7, 5, 5, 5, 7],
        'P' => [7, 5, 7, 4, 4],
        'Q' => [7, 5, 5, 7, 1],
        'R' => [7, 5, 6, 5, 5],
        'S' => [7, 4, 7, 1, 7],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'X' => [5, 5, 2, 5, 5],
        ' ' => [0; 5],
        ':' => [0, 2, 0, 2, 0],
        '.' => [0, 0, 0, 0, 2],
        '/' => [1, 1, 2, 4, 4],
        '=' => [0, 7, 0, 7, 0],
        _ => [7, 7, 7, 7, 7],
    }
}

type Series = (&'static str, [u8; 3], fn(&Sample) -> u32);

/// Renders the timeline of `r` as PNG bytes.
pub fn render(r: &SimResult) -> Result<Vec<u8>, String> {
    if r.timeline.is_empty() {
        return Err("the result has no timeline to plot".into());
    }
    let series: [Series; 4] = [
        ("QUEUED", [214, 39, 40], |s| s.queued),
        ("RUNNING", [44, 160, 44], |s| s.running),
        ("VMS", [31, 119, 180], |s| s.vms),
        ("REPLICAS", [148, 103, 189], |s| s.replicas),
    ];
    let h = series.len() * (PANEL_H + PAD) + PAD + 20;
    let mut c = Canvas::new(W, h);
    let t0 = r.timeline[0].t;
    let t1 = r.timeline.last().map_or(t0 + 1.0, |s| s.t).max(t0 + 1.0);
    let x0 = 60;
    let plot_w = W - x0 - PAD;
    for (k, (name, color, get)) in series.iter().enumerate() {
        let top = PAD + k * (PANEL_H + PAD);
        let bottom = top + PANEL_H;
        let peak = r.timeline.iter().map(get).max().unwrap_or(0).max(1);
        c.vline(x0, top, bottom, AXIS);
        c.hline(x0, x0 + plot_w, bottom, AXIS);
        c.text(x0 + 8, top + 2, &format!("{name} MAX {peak}"), TEXT);
        let mut last: Option<(usize, usize)> = None;
        for s in &r.timeline {
            let x = x0 + (((s.t - t0) / (t1 - t0)) * plot_w as f64) as usize;
            let y = bottom - (get(s) as usize * (PANEL_H - 14) / peak as usize);
            if let Some((lx, ly)) = last {
                c.vline(x, ly, y, *color);
                for xx in lx..=x {
                    c.set(xx, ly, *color);
                }
            }
            last = Some((x, y));
        }
    }
    let hours = (t1 - t0) / 3600.0;
    c.text(x0, h - 16, &format!("TIME 0 TO {hours:.1} H"), TEXT);
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, W as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(&c.px).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Writes the timeline of `r` as a PNG file.
pub fn write_png(r: &SimResult, p: &Path) -> Result<(), String> {
    let bytes = render(r)?;
    std::fs::write(p, bytes).map_err(|e| format!("cannot write {}: {e}", p.display()))
}
