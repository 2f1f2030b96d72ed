// SPDX-License-Identifier: MPL-2.0
//! The loading picture, in plain Rust (no GStreamer types): geometry, the text and spinner
//! sprites, the dimmed greyscale background and the writers into packed RGB or planar YUV
//! memory. Everything follows docs/runner.md, "Loading picture".
//!
//! The picture is grey everywhere (greyscale background, white/black sprites), so it is kept as
//! one 8-bit grey plane (the *canvas*) in the output's value domain: full-range grey for RGB
//! formats, the Y code value (full or limited range) for YUV formats, where chroma is 128.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use std::sync::LazyLock;

/// DejaVu Sans 2.37 (Bitstream Vera licence, see assets/LICENSE-DejaVu.txt).
static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The shipped font, parsed once. `None` only if the shipped file were corrupt; the text is
/// then left out (and the element logs it), the rest of the picture is still drawn.
pub static FONT: LazyLock<Option<FontRef<'static>>> =
    LazyLock::new(|| FontRef::try_from_slice(FONT_BYTES).ok());

/// Number of pre-rotated spinner frames.
pub const SPINNER_FRAMES: usize = 32;
/// Supersampling factor of the spinner.
const SUPERSAMPLE: usize = 3;
/// Black layer at alpha 90/255: values are multiplied by (255 - 90) / 255.
const DIM_KEEP: u32 = 255 - 90;
/// Spinner alpha.
const SPINNER_ALPHA: f32 = 230.0;
/// Text stroke: width in pixels and alpha.
const STROKE_WIDTH: f32 = 2.0;
const STROKE_ALPHA: f32 = 160.0;
/// Mid-grey used when no recent frame is available.
pub const MID_GREY: u8 = 128;

/// The value domain of the canvas: `black + span * v / 255` for a full-range grey `v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Domain {
    pub black: u8,
    pub span: u8,
}

impl Domain {
    /// Full range: RGB, or YUV with full-range colorimetry.
    pub const FULL: Domain = Domain {
        black: 0,
        span: 255,
    };
    /// Limited ("TV") range Y: 16..=235.
    pub const LIMITED: Domain = Domain {
        black: 16,
        span: 219,
    };

    /// Maps a full-range grey value into this domain.
    pub fn from_full(self, v: u8) -> u8 {
        (u32::from(self.black) + (u32::from(self.span) * u32::from(v) + 127) / 255).min(255) as u8
    }

    /// The black layer at alpha 90/255 over `v` (values move towards black by 90/255).
    pub fn dim(self, v: u8) -> u8 {
        let above = u32::from(v.saturating_sub(self.black));
        (u32::from(self.black) + (above * DIM_KEEP + 127) / 255).min(255) as u8
    }

    /// Composites a sprite pixel (premultiplied full-range grey `c`, alpha `a`) over `bg`.
    #[inline]
    pub fn blend(self, bg: u8, c: u8, a: u8) -> u8 {
        let above = u32::from(bg.saturating_sub(self.black));
        let v = u32::from(self.black)
            + (u32::from(self.span) * u32::from(c) + above * (255 - u32::from(a)) + 127) / 255;
        v.min(255) as u8
    }

    /// A table of `dim` for every input value.
    fn dim_lut(self) -> [u8; 256] {
        let mut lut = [0u8; 256];
        for (v, out) in lut.iter_mut().enumerate() {
            *out = self.dim(v as u8);
        }
        lut
    }
}

/// Sizes and positions for one frame size (docs/runner.md, "Loading picture"; fractional sizes are
/// truncated to whole pixels, as the runner does with `int()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub width: u32,
    pub height: u32,
    /// Spinner (outer) radius: max(8, 0.035·m).
    pub radius: u32,
    /// Spinner stroke width: max(3, 0.008·m).
    pub thickness: u32,
    /// Text size in pixels per em: max(14, 0.04·m).
    pub font_px: u32,
    /// Frame centre (integer division, as the runner).
    pub cx: i32,
    pub cy: i32,
}

impl Geometry {
    pub fn new(width: u32, height: u32) -> Self {
        let m = u64::from(width.min(height));
        let radius = (m * 35 / 1000).max(8) as u32;
        let thickness = (m * 8 / 1000).max(3) as u32;
        let font_px = (m * 4 / 100).max(14) as u32;
        Geometry {
            width,
            height,
            radius,
            thickness,
            font_px,
            cx: (width / 2) as i32,
            cy: (height / 2) as i32,
        }
    }

    /// Side of the (square) spinner sprite: 2·radius + thickness.
    pub fn spinner_size(&self) -> u32 {
        2 * self.radius + self.thickness
    }

    /// The y coordinate of the text's bottom edge: radius + max(10, thickness) above the centre.
    pub fn text_bottom(&self) -> i32 {
        self.cy - self.radius as i32 - self.thickness.max(10) as i32
    }
}

/// An alpha sprite of premultiplied grey: `color[i] <= alpha[i]`, both 0..=255.
#[derive(Clone, Debug, Default)]
pub struct Sprite {
    /// Top-left corner in the frame (may be negative or overflow: drawing clips).
    pub x: i32,
    pub y: i32,
    pub w: usize,
    pub h: usize,
    pub color: Vec<u8>,
    pub alpha: Vec<u8>,
}

/// The visible part of a sprite in a `fw`×`fh` frame: (frame x0, frame y0, sprite x0, sprite y0, w, h).
fn clip(s: &Sprite, fw: usize, fh: usize) -> Option<(usize, usize, usize, usize, usize, usize)> {
    let x0 = s.x.max(0) as i64;
    let y0 = s.y.max(0) as i64;
    let x1 = (i64::from(s.x) + s.w as i64).min(fw as i64);
    let y1 = (i64::from(s.y) + s.h as i64).min(fh as i64);
    if x1 <= x0 || y1 <= y0 {
        return None;
    }
    let sx = (x0 - i64::from(s.x)) as usize;
    let sy = (y0 - i64::from(s.y)) as usize;
    Some((
        x0 as usize,
        y0 as usize,
        sx,
        sy,
        (x1 - x0) as usize,
        (y1 - y0) as usize,
    ))
}

impl Sprite {
    /// Composites the sprite onto a `fw`×`fh` canvas (row length `fw`).
    pub fn blend_into(&self, canvas: &mut [u8], fw: usize, fh: usize, domain: Domain) {
        let Some((fx, fy, sx, sy, w, h)) = clip(self, fw, fh) else {
            return;
        };
        for row in 0..h {
            let c_off = (fy + row) * fw + fx;
            let s_off = (sy + row) * self.w + sx;
            let dst = &mut canvas[c_off..c_off + w];
            let col = &self.color[s_off..s_off + w];
            let alp = &self.alpha[s_off..s_off + w];
            for ((d, &c), &a) in dst.iter_mut().zip(col).zip(alp) {
                if a != 0 {
                    *d = domain.blend(*d, c, a);
                }
            }
        }
    }
}

fn lanczos3(x: f32) -> f32 {
    let x = x.abs();
    if x < 1e-6 {
        1.0
    } else if x < 3.0 {
        let px = std::f32::consts::PI * x;
        3.0 * px.sin() * (px / 3.0).sin() / (px * px)
    } else {
        0.0
    }
}

/// Lanczos-3 weights for downsampling `n_in` samples by `SUPERSAMPLE`: per output sample, the
/// first input index and the normalised weights.
fn lanczos_taps(n_in: usize) -> Vec<(usize, Vec<f32>)> {
    let f = SUPERSAMPLE as f32;
    let support = 3.0 * f;
    (0..n_in / SUPERSAMPLE)
        .map(|i| {
            let centre = (i as f32 + 0.5) * f;
            let first = (centre - support).floor().max(0.0) as usize;
            let last = ((centre + support).ceil() as usize).min(n_in);
            let mut w: Vec<f32> = (first..last)
                .map(|j| lanczos3((j as f32 + 0.5 - centre) / f))
                .collect();
            let sum: f32 = w.iter().sum();
            if sum.abs() > 1e-6 {
                w.iter_mut().for_each(|x| *x /= sum);
            }
            (first, w)
        })
        .collect()
}

/// Downsamples a square `n`×`n` image by `SUPERSAMPLE` with a separable Lanczos-3 filter,
/// clamping the result to [0, 1].
fn downsample(src: &[f32], n: usize, taps: &[(usize, Vec<f32>)]) -> Vec<f32> {
    let m = taps.len();
    // Horizontal pass: n rows × m columns.
    let mut tmp = vec![0f32; n * m];
    for y in 0..n {
        let row = &src[y * n..(y + 1) * n];
        for (x, (first, w)) in taps.iter().enumerate() {
            tmp[y * m + x] = w.iter().zip(&row[*first..]).map(|(a, b)| a * b).sum();
        }
    }
    // Vertical pass: m × m.
    let mut out = vec![0f32; m * m];
    for (y, (first, w)) in taps.iter().enumerate() {
        for x in 0..m {
            let v: f32 = w
                .iter()
                .enumerate()
                .map(|(k, wk)| wk * tmp[(first + k) * m + x])
                .sum();
            out[y * m + x] = v.clamp(0.0, 1.0);
        }
    }
    out
}

/// The 32 pre-rotated spinner sprites: a white 270° arc at alpha 230, outer radius `radius`,
/// stroke `thickness` inwards, drawn at 3× supersampling and downsampled with Lanczos-3.
///
/// Frame 0 covers the screen angles 0°..270° clockwise from 3 o'clock (the gap is between
/// 12 and 3 o'clock); frame k is rotated counter-clockwise by k·11.25°, as the runner's
/// `Image.rotate(k * 360 / 32)`.
pub fn spinner_sprites(g: &Geometry) -> Vec<Sprite> {
    let s = g.spinner_size() as usize;
    let n = s * SUPERSAMPLE;
    let centre = n as f32 / 2.0;
    let outer = (g.radius as usize * SUPERSAMPLE) as f32;
    let inner = (outer - (g.thickness as usize * SUPERSAMPLE) as f32).max(0.0);
    // Per supersampled pixel: inside the ring, and its screen angle (degrees, clockwise).
    let mut ring: Vec<Option<f32>> = Vec::with_capacity(n * n);
    for y in 0..n {
        for x in 0..n {
            let dx = x as f32 + 0.5 - centre;
            let dy = y as f32 + 0.5 - centre;
            let d = (dx * dx + dy * dy).sqrt();
            ring.push(if d <= outer && d >= inner {
                Some(dy.atan2(dx).to_degrees().rem_euclid(360.0))
            } else {
                None
            });
        }
    }
    let taps = lanczos_taps(n);
    let x = ((2 * g.cx - s as i32) as f32 / 2.0).floor() as i32;
    let y = ((2 * g.cy - s as i32) as f32 / 2.0).floor() as i32;
    let mut hr = vec![0f32; n * n];
    (0..SPINNER_FRAMES)
        .map(|k| {
            let phi = k as f32 * (360.0 / SPINNER_FRAMES as f32);
            for (v, r) in hr.iter_mut().zip(&ring) {
                *v = match r {
                    Some(theta) if (theta + phi).rem_euclid(360.0) <= 270.0 => 1.0,
                    _ => 0.0,
                };
            }
            let cov = downsample(&hr, n, &taps);
            let alpha: Vec<u8> = cov
                .iter()
                .map(|c| (c * SPINNER_ALPHA).round() as u8)
                .collect();
            Sprite {
                x,
                y,
                w: s,
                h: s,
                // White, premultiplied: colour equals alpha.
                color: alpha.clone(),
                alpha,
            }
        })
        .collect()
}

/// Spinner frame for a running time in nanoseconds: floor(t × 16) mod 32 (180°/s).
pub fn spinner_index(running_time_ns: u64) -> usize {
    ((u128::from(running_time_ns) * 16 / 1_000_000_000) % SPINNER_FRAMES as u128) as usize
}

/// The text sprite: white glyphs with a 2 px black stroke at alpha 160, its bounding box
/// (stroke included) centred horizontally with its bottom edge at `g.text_bottom()`.
/// `None` for an empty text or when no glyph has an outline.
pub fn text_sprite(font: &FontRef<'_>, text: &str, g: &Geometry) -> Option<Sprite> {
    let units = font.units_per_em()?;
    // PIL/FreeType sizes are pixels per em; ab_glyph's PxScale is the ascent-descent height.
    let px = g.font_px as f32 * font.height_unscaled() / units;
    let scale = PxScale::from(px);
    let sf = font.as_scaled(scale);
    let mut caret = 0.0f32;
    let mut prev = None;
    let mut outlines = Vec::new();
    for ch in text.chars().filter(|c| !c.is_control()) {
        let id = sf.glyph_id(ch);
        if let Some(p) = prev {
            caret += sf.kern(p, id);
        }
        let glyph = id.with_scale_and_position(scale, point(caret, sf.ascent()));
        caret += sf.h_advance(id);
        prev = Some(id);
        if let Some(o) = sf.outline_glyph(glyph) {
            outlines.push(o);
        }
    }
    let first = outlines.first()?;
    let mut min = first.px_bounds().min;
    let mut max = first.px_bounds().max;
    for o in &outlines {
        let b = o.px_bounds();
        min.x = min.x.min(b.min.x);
        min.y = min.y.min(b.min.y);
        max.x = max.x.max(b.max.x);
        max.y = max.y.max(b.max.y);
    }
    let margin = 3usize;
    let w = (max.x - min.x).ceil() as usize + 2 * margin;
    let h = (max.y - min.y).ceil() as usize + 2 * margin;
    let mut fill = vec![0f32; w * h];
    for o in &outlines {
        let b = o.px_bounds();
        let ox = (b.min.x - min.x).round() as usize + margin;
        let oy = (b.min.y - min.y).round() as usize + margin;
        o.draw(|x, y, c| {
            let (px, py) = (ox + x as usize, oy + y as usize);
            if px < w && py < h {
                let v = &mut fill[py * w + px];
                *v = (*v + c).min(1.0);
            }
        });
    }
    // Stroke coverage from the distance to the glyph edge, estimated from the anti-aliased
    // fill: a pixel q with coverage c puts the edge at about |p - q| + 0.5 - c from p.
    let reach = margin as i32;
    let mut stroke = vec![0f32; w * h];
    for py in 0..h as i32 {
        for px in 0..w as i32 {
            let mut d = f32::INFINITY;
            for qy in (py - reach).max(0)..(py + reach + 1).min(h as i32) {
                for qx in (px - reach).max(0)..(px + reach + 1).min(w as i32) {
                    let c = fill[qy as usize * w + qx as usize];
                    if c > 0.0 {
                        let dist = (((qx - px).pow(2) + (qy - py).pow(2)) as f32).sqrt();
                        d = d.min(dist + 0.5 - c);
                    }
                }
            }
            stroke[py as usize * w + px as usize] = (STROKE_WIDTH + 0.5 - d).clamp(0.0, 1.0);
        }
    }
    // White fill over the black stroke layer, premultiplied.
    let mut color = vec![0u8; w * h];
    let mut alpha = vec![0u8; w * h];
    for i in 0..w * h {
        let f = fill[i];
        let sa = STROKE_ALPHA / 255.0 * stroke[i];
        let a = f + sa * (1.0 - f);
        color[i] = (f * 255.0).round() as u8;
        alpha[i] = (a * 255.0).round().max(f32::from(color[i])) as u8;
    }
    // Crop to the visible pixels so that "bottom edge" and "centred" refer to the ink.
    let rows: Vec<usize> = (0..h)
        .filter(|&y| alpha[y * w..(y + 1) * w].iter().any(|&a| a > 0))
        .collect();
    let cols: Vec<usize> = (0..w)
        .filter(|&x| (0..h).any(|y| alpha[y * w + x] > 0))
        .collect();
    let (&y0, &y1) = (rows.first()?, rows.last()?);
    let (&x0, &x1) = (cols.first()?, cols.last()?);
    let (cw, ch) = (x1 - x0 + 1, y1 - y0 + 1);
    let crop = |src: &[u8]| -> Vec<u8> {
        (y0..=y1)
            .flat_map(|y| src[y * w + x0..=y * w + x1].iter().copied())
            .collect()
    };
    Some(Sprite {
        x: ((2 * g.cx - cw as i32) as f32 / 2.0).floor() as i32,
        y: g.text_bottom() - ch as i32,
        w: cw,
        h: ch,
        color: crop(&color),
        alpha: crop(&alpha),
    })
}

/// How a frame's bytes are laid out, for the formats the element handles natively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelLayout {
    /// One plane of `bpp`-byte pixels; byte offsets of R, G, B and of alpha if any.
    Packed {
        bpp: usize,
        rgb: [usize; 3],
        alpha: Option<usize>,
    },
    /// Y in plane 0, chroma in the other planes (planar or semi-planar).
    Yuv,
}

impl PixelLayout {
    pub fn is_rgb(&self) -> bool {
        matches!(self, PixelLayout::Packed { .. })
    }
}

/// Writes grey values as packed pixels: every byte the grey value, the alpha byte (if any) 255.
fn put_packed(dst: &mut [u8], src: &[u8], bpp: usize, alpha: Option<usize>) {
    match bpp {
        3 => {
            for (d, &g) in dst.chunks_exact_mut(3).zip(src) {
                d.copy_from_slice(&[g, g, g]);
            }
        }
        4 => {
            let a = alpha.unwrap_or(4);
            for (d, &g) in dst.chunks_exact_mut(4).zip(src) {
                let mut px = [g; 4];
                if a < 4 {
                    px[a] = 255;
                }
                d.copy_from_slice(&px);
            }
        }
        _ => {}
    }
}

/// Everything pre-rendered for one negotiated size and value domain.
#[derive(Debug)]
pub struct Overlay {
    pub geometry: Geometry,
    pub domain: Domain,
    pub text: Option<Sprite>,
    pub spinner: Vec<Sprite>,
}

impl Overlay {
    pub fn new(width: u32, height: u32, domain: Domain, text: &str) -> Self {
        let geometry = Geometry::new(width, height);
        let text = FONT
            .as_ref()
            .and_then(|font| text_sprite(font, text, &geometry));
        Overlay {
            geometry,
            domain,
            text,
            spinner: spinner_sprites(&geometry),
        }
    }

    fn dims(&self) -> (usize, usize) {
        (self.geometry.width as usize, self.geometry.height as usize)
    }

    /// The canvas over mid-grey: dim(128) everywhere, then the text.
    pub fn grey_canvas(&self, canvas: &mut Vec<u8>) {
        let (w, h) = self.dims();
        canvas.clear();
        canvas.resize(w * h, self.domain.dim(self.domain.from_full(MID_GREY)));
        self.finish_canvas(canvas);
    }

    /// The canvas from a packed RGB frame: greyscale (Pillow's L: 0.299/0.587/0.114 in 16-bit
    /// fixed point), dimmed, then the text. `data` is plane 0 with `stride` bytes per row.
    pub fn rgb_canvas(
        &self,
        data: &[u8],
        stride: usize,
        layout: PixelLayout,
        canvas: &mut Vec<u8>,
    ) -> bool {
        let PixelLayout::Packed { bpp, rgb, .. } = layout else {
            return false;
        };
        let (w, h) = self.dims();
        if stride < w * bpp || data.len() < stride * (h - 1) + w * bpp {
            return false;
        }
        let lut = self.domain.dim_lut();
        canvas.clear();
        canvas.resize(w * h, 0);
        for (y, out) in canvas.chunks_exact_mut(w).enumerate() {
            let row = &data[y * stride..y * stride + w * bpp];
            for (px, o) in row.chunks_exact(bpp).zip(out.iter_mut()) {
                let l = (u32::from(px[rgb[0]]) * 19595
                    + u32::from(px[rgb[1]]) * 38470
                    + u32::from(px[rgb[2]]) * 7471
                    + 0x8000)
                    >> 16;
                *o = lut[l.min(255) as usize];
            }
        }
        self.finish_canvas(canvas);
        true
    }

    /// The canvas from a Y plane: the luma as is (chroma dropped), dimmed, then the text.
    pub fn luma_canvas(&self, data: &[u8], stride: usize, canvas: &mut Vec<u8>) -> bool {
        let (w, h) = self.dims();
        if stride < w || data.len() < stride * (h - 1) + w {
            return false;
        }
        let lut = self.domain.dim_lut();
        canvas.clear();
        canvas.resize(w * h, 0);
        for (y, out) in canvas.chunks_exact_mut(w).enumerate() {
            let row = &data[y * stride..y * stride + w];
            for (i, o) in row.iter().zip(out.iter_mut()) {
                *o = lut[*i as usize];
            }
        }
        self.finish_canvas(canvas);
        true
    }

    fn finish_canvas(&self, canvas: &mut [u8]) {
        let (w, h) = self.dims();
        if let Some(text) = &self.text {
            text.blend_into(canvas, w, h, self.domain);
        }
    }

    /// Writes the canvas plus spinner frame `index` into packed RGB memory.
    /// Expands the grey canvas into packed pixels (all colour bytes = grey, alpha 255), once
    /// per background, so that each frame is a row copy.
    pub fn expand_packed(
        &self,
        canvas: &[u8],
        bpp: usize,
        alpha: Option<usize>,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.resize(canvas.len() * bpp, 0);
        put_packed(out, canvas, bpp, alpha);
    }

    /// Writes the expanded canvas plus spinner frame `index` into packed RGB memory.
    #[allow(clippy::too_many_arguments)] // plain pixel-layout parameters, kept explicit
    pub fn write_packed(
        &self,
        canvas: &[u8],
        expanded: &[u8],
        index: usize,
        dst: &mut [u8],
        stride: usize,
        bpp: usize,
        alpha: Option<usize>,
    ) -> bool {
        let (w, h) = self.dims();
        let row = w * bpp;
        if canvas.len() != w * h
            || expanded.len() != row * h
            || stride < row
            || dst.len() < stride * (h - 1) + row
        {
            return false;
        }
        for (y, src) in expanded.chunks_exact(row).enumerate() {
            dst[y * stride..y * stride + row].copy_from_slice(src);
        }
        self.with_spinner_rows(canvas, index, |y, x, vals| {
            let off = y * stride + x * bpp;
            put_packed(&mut dst[off..off + vals.len() * bpp], vals, bpp, alpha);
        });
        true
    }

    /// Writes the canvas plus spinner frame `index` into a Y plane (the caller sets chroma).
    pub fn write_luma(&self, canvas: &[u8], index: usize, dst: &mut [u8], stride: usize) -> bool {
        let (w, h) = self.dims();
        if canvas.len() != w * h || stride < w || dst.len() < stride * (h - 1) + w {
            return false;
        }
        for (y, src) in canvas.chunks_exact(w).enumerate() {
            dst[y * stride..y * stride + w].copy_from_slice(src);
        }
        self.with_spinner_rows(canvas, index, |y, x, vals| {
            let off = y * stride + x;
            dst[off..off + vals.len()].copy_from_slice(vals);
        });
        true
    }

    /// Calls `f(y, x0, values)` for each visible row of the spinner composited over the canvas.
    fn with_spinner_rows(
        &self,
        canvas: &[u8],
        index: usize,
        mut f: impl FnMut(usize, usize, &[u8]),
    ) {
        let (w, h) = self.dims();
        let Some(s) = self.spinner.get(index % SPINNER_FRAMES.max(1)) else {
            return;
        };
        let Some((fx, fy, sx, sy, cw, ch)) = clip(s, w, h) else {
            return;
        };
        let mut row = vec![0u8; cw];
        for r in 0..ch {
            let c_off = (fy + r) * w + fx;
            let s_off = (sy + r) * s.w + sx;
            for (i, v) in row.iter_mut().enumerate() {
                *v = self
                    .domain
                    .blend(canvas[c_off + i], s.color[s_off + i], s.alpha[s_off + i]);
            }
            f(fy + r, fx, &row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_runner_formulas() {
        let g = Geometry::new(512, 512);
        assert_eq!((g.radius, g.thickness, g.font_px), (17, 4, 20));
        assert_eq!(g.text_bottom(), 256 - 17 - 10);
        let g = Geometry::new(1920, 1080);
        assert_eq!((g.radius, g.thickness, g.font_px), (37, 8, 43));
        let g = Geometry::new(64, 48);
        assert_eq!((g.radius, g.thickness, g.font_px), (8, 3, 14));
    }

    #[test]
    fn dim_and_domains() {
        assert_eq!(Domain::FULL.dim(255), 165);
        assert_eq!(Domain::FULL.dim(128), 83);
        assert_eq!(Domain::FULL.dim(0), 0);
        assert_eq!(Domain::LIMITED.dim(16), 16);
        assert_eq!(
            Domain::LIMITED.dim(235),
            (16 + (219 * 165 + 127) / 255) as u8
        );
        assert_eq!(Domain::LIMITED.from_full(255), 235);
        assert_eq!(Domain::LIMITED.from_full(0), 16);
        // Opaque white over anything is white; transparent leaves the background.
        assert_eq!(Domain::FULL.blend(40, 255, 255), 255);
        assert_eq!(Domain::LIMITED.blend(40, 255, 255), 235);
        assert_eq!(Domain::FULL.blend(40, 0, 0), 40);
        // Black at alpha 160 over 200.
        assert_eq!(
            Domain::FULL.blend(200, 0, 160),
            ((200u32 * 95 + 127) / 255) as u8
        );
    }

    #[test]
    fn spinner_index_turns_at_180_degrees_per_second() {
        assert_eq!(spinner_index(0), 0);
        assert_eq!(spinner_index(62_499_999), 0);
        assert_eq!(spinner_index(62_500_000), 1);
        assert_eq!(spinner_index(500_000_000), 8);
        assert_eq!(spinner_index(1_000_000_000), 16);
        assert_eq!(spinner_index(2_000_000_000), 0);
        assert_eq!(
            spinner_index(u64::MAX),
            ((u128::from(u64::MAX) * 16 / 1_000_000_000) % 32) as usize
        );
    }

    #[test]
    fn spinner_is_an_antialiased_arc_with_a_gap() {
        let g = Geometry::new(512, 512);
        let sprites = spinner_sprites(&g);
        assert_eq!(sprites.len(), SPINNER_FRAMES);
        let s = &sprites[0];
        let n = s.w as f32;
        let at = |deg: f32| {
            let r = g.radius as f32 - g.thickness as f32 / 2.0;
            let x = (n / 2.0 + r * deg.to_radians().cos()) as usize;
            let y = (n / 2.0 + r * deg.to_radians().sin()) as usize;
            s.alpha[y * s.w + x]
        };
        // Arc from 0° to 270° clockwise (screen), gap from 270° to 360°.
        for deg in [30.0, 90.0, 180.0, 240.0] {
            assert!(at(deg) >= 200, "arc at {deg}° = {}", at(deg));
        }
        assert_eq!(at(315.0), 0);
        // Anti-aliased: some partial coverage, never above 230.
        assert!(s.alpha.iter().any(|&a| a > 0 && a < 200));
        assert!(s.alpha.iter().all(|&a| a <= 230));
        // Frame 8 is rotated counter-clockwise by 90°: the gap moves to 225°.
        let s8 = &sprites[8];
        let r = g.radius as f32 - g.thickness as f32 / 2.0;
        let x = (n / 2.0 + r * 225f32.to_radians().cos()) as usize;
        let y = (n / 2.0 + r * 225f32.to_radians().sin()) as usize;
        assert_eq!(s8.alpha[y * s8.w + x], 0);
    }

    #[test]
    fn text_is_white_with_a_dark_stroke_above_the_spinner() {
        let g = Geometry::new(512, 512);
        let font = FONT.as_ref().expect("shipped font parses");
        let t = text_sprite(font, "Loading pipeline\u{2026}", &g).expect("text has ink");
        assert_eq!(t.y + t.h as i32, g.text_bottom());
        assert!((t.x + t.w as i32 / 2 - g.cx).abs() <= 1);
        // Fully white pixels exist, and stroke-only pixels (alpha ~160, colour 0).
        assert!(
            t.color
                .iter()
                .zip(&t.alpha)
                .any(|(&c, &a)| c == 255 && a == 255)
        );
        assert!(
            t.color
                .iter()
                .zip(&t.alpha)
                .any(|(&c, &a)| c == 0 && a == 160)
        );
        // About 20 px per em: the text is a plausible size.
        assert!(t.h > 14 && t.h < 40, "height {}", t.h);
        assert!(t.w > 120 && t.w < 260, "width {}", t.w);
        assert!(text_sprite(font, "", &g).is_none());
    }
}
