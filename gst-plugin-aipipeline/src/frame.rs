// SPDX-License-Identifier: MPL-2.0
//! Frame conversion: packed 8-bit RGB-family video <-> device tensors, with cover-scaling and
//! centre-cropping done on the device.

use gst_video::VideoFormat;
use tch::{Device, Kind, TchError, Tensor};

use crate::par;

/// Packed 8-bit RGB-family input formats.
pub const PACKED_FORMATS: &[VideoFormat] = &[
    VideoFormat::Rgb,
    VideoFormat::Bgr,
    VideoFormat::Rgbx,
    VideoFormat::Rgba,
    VideoFormat::Bgrx,
    VideoFormat::Bgra,
    VideoFormat::Xrgb,
    VideoFormat::Argb,
    VideoFormat::Xbgr,
    VideoFormat::Abgr,
];

/// 4:2:0 YUV input formats, converted to RGB on the device.
pub const YUV_FORMATS: &[VideoFormat] = &[VideoFormat::I420, VideoFormat::Nv12];

/// Every input format (sink caps).
pub fn input_formats() -> impl Iterator<Item = VideoFormat> {
    PACKED_FORMATS.iter().chain(YUV_FORMATS).copied()
}

/// Output formats (RGB first: the preferred one).
pub const OUTPUT_FORMATS: &[VideoFormat] =
    &[VideoFormat::Rgb, VideoFormat::Rgbx, VideoFormat::Rgba];

/// Bytes per pixel and where the R byte sits, and whether the order is B,G,R.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelLayout {
    pub bpp: i64,
    /// Offset of the first colour byte.
    pub first: i64,
    /// Colour bytes are B, G, R rather than R, G, B.
    pub bgr: bool,
}

pub fn pixel_layout(f: VideoFormat) -> Option<PixelLayout> {
    use VideoFormat::*;
    let (bpp, first, bgr) = match f {
        Rgb => (3, 0, false),
        Bgr => (3, 0, true),
        Rgbx | Rgba => (4, 0, false),
        Bgrx | Bgra => (4, 0, true),
        Xrgb | Argb => (4, 1, false),
        Xbgr | Abgr => (4, 1, true),
        _ => return None,
    };
    Some(PixelLayout { bpp, first, bgr })
}

/// A source rectangle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crop {
    pub x: i64,
    pub y: i64,
    pub w: i64,
    pub h: i64,
}

/// The centred region of an `in_w`×`in_h` frame that, scaled to cover, fills `out_w`×`out_h`.
pub fn cover_crop(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> Crop {
    let (iw, ih, ow, oh) = (in_w as u64, in_h as u64, out_w as u64, out_h as u64);
    let (w, h) = if ow * ih >= oh * iw {
        // Width-limited: keep the full width, crop rows.
        (iw, ((iw * oh + ow / 2) / ow).clamp(1, ih))
    } else {
        (((ih * ow + oh / 2) / oh).clamp(1, iw), ih)
    };
    Crop {
        x: ((iw - w) / 2) as i64,
        y: ((ih - h) / 2) as i64,
        w: w as i64,
        h: h as i64,
    }
}

fn check_len(len: usize, stride: usize, width: u32, height: u32, bpp: i64) -> Result<(), TchError> {
    let need = if height == 0 {
        0
    } else {
        (height as usize - 1) * stride + width as usize * bpp as usize
    };
    if len < need || stride < width as usize * bpp as usize {
        return Err(TchError::Convert(format!(
            "frame plane too small: {len} bytes, stride {stride}, need {need}"
        )));
    }
    Ok(())
}

/// YUV → RGB conversion constants (from the caps' colorimetry).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YuvMatrix {
    pub kr: f64,
    pub kb: f64,
    /// 0–255 rather than 16–235 (luma) / 16–240 (chroma).
    pub full_range: bool,
}

impl YuvMatrix {
    pub fn from_info(info: &gst_video::VideoInfo) -> Self {
        use gst_video::VideoColorMatrix as M;
        let c = info.colorimetry();
        let (kr, kb) = match c.matrix() {
            M::Bt709 => (0.2126, 0.0722),
            M::Bt2020 => (0.2627, 0.0593),
            M::Fcc => (0.30, 0.11),
            M::Smpte240m => (0.212, 0.087),
            _ => (0.299, 0.114),
        };
        Self {
            kr,
            kb,
            full_range: c.range() == gst_video::VideoColorRange::Range0_255,
        }
    }
}

fn plane_region(
    data: &[u8],
    stride: usize,
    (width, height, bpp): (u32, u32, i64),
    (x, y, w, h): (i64, i64, i64, i64),
    device: Device,
) -> Result<Tensor, TchError> {
    check_len(data.len(), stride, width, height, bpp)?;
    if x < 0 || y < 0 || w <= 0 || h <= 0 || x + w > width as i64 || y + h > height as i64 {
        return Err(TchError::Convert(format!(
            "region {x},{y} {w}x{h} outside a {width}x{height} plane"
        )));
    }
    // SAFETY: `data` holds at least (height-1)*stride + width*bpp bytes (checked above), so
    // every element of the (height, width, bpp) view with strides (stride, bpp, 1) lies inside
    // it. The view is only read by copy_ below and dropped before returning, while `data` is
    // still borrowed.
    let blob = unsafe {
        Tensor::f_from_blob(
            data.as_ptr(),
            &[height as i64, width as i64, bpp],
            &[stride as i64, bpp, 1],
            Kind::Uint8,
            Device::Cpu,
        )?
    };
    let region = blob.f_narrow(0, y, h)?.f_narrow(1, x, w)?;
    let mut dst = Tensor::f_empty([h, w, bpp], (Kind::Uint8, device))?;
    dst.f_copy_(&region)?;
    Ok(dst)
}

/// Uploads the `crop` region of a 4:2:0 frame (I420: planes Y, U, V; NV12: planes Y, UV) and
/// converts it to u8 (h, w, 3) RGB on `device` (chroma upsampled by pixel repetition).
#[allow(clippy::too_many_arguments)] // the planes, their geometry and the target, all needed
pub fn upload_yuv420(
    planes: &[&[u8]],
    strides: &[usize],
    width: u32,
    height: u32,
    nv12: bool,
    m: YuvMatrix,
    crop: Crop,
    device: Device,
) -> Result<Tensor, TchError> {
    let need = if nv12 { 2 } else { 3 };
    if planes.len() < need || strides.len() < need {
        return Err(TchError::Convert(format!("{need} planes expected")));
    }
    // Luma region aligned to even coordinates so it starts on a chroma sample.
    let (x0, y0) = (crop.x & !1, crop.y & !1);
    let (x1, y1) = (crop.x + crop.w, crop.y + crop.h);
    let (lw, lh) = (x1 - x0, y1 - y0);
    let (cx0, cy0) = (x0 / 2, y0 / 2);
    let (cw, ch) = ((x1 + 1) / 2 - cx0, (y1 + 1) / 2 - cy0);
    let (pw, ph) = (width.div_ceil(2), height.div_ceil(2));
    let y = plane_region(
        planes[0],
        strides[0],
        (width, height, 1),
        (x0, y0, lw, lh),
        device,
    )?
    .f_squeeze_dim(2)?
    .f_to_kind(Kind::Float)?;
    let (u, v) = if nv12 {
        let uv = plane_region(
            planes[1],
            strides[1],
            (pw, ph, 2),
            (cx0, cy0, cw, ch),
            device,
        )?
        .f_to_kind(Kind::Float)?;
        (uv.f_select(2, 0)?, uv.f_select(2, 1)?)
    } else {
        let u = plane_region(
            planes[1],
            strides[1],
            (pw, ph, 1),
            (cx0, cy0, cw, ch),
            device,
        )?;
        let v = plane_region(
            planes[2],
            strides[2],
            (pw, ph, 1),
            (cx0, cy0, cw, ch),
            device,
        )?;
        (
            u.f_squeeze_dim(2)?.f_to_kind(Kind::Float)?,
            v.f_squeeze_dim(2)?.f_to_kind(Kind::Float)?,
        )
    };
    let (y, u, v) = if m.full_range {
        (y, u.f_sub_scalar(128.0)?, v.f_sub_scalar(128.0)?)
    } else {
        (
            y.f_sub_scalar(16.0)?.f_mul_scalar_(255.0 / 219.0)?,
            u.f_sub_scalar(128.0)?.f_mul_scalar_(255.0 / 224.0)?,
            v.f_sub_scalar(128.0)?.f_mul_scalar_(255.0 / 224.0)?,
        )
    };
    // The chroma part of R, G, B at chroma resolution (a quarter of the pixels), then
    // upsampled by repetition and added to luma: most of the arithmetic stays small.
    let kg = 1.0 - m.kr - m.kb;
    let cr = v.f_mul_scalar(2.0 * (1.0 - m.kr))?;
    let cg = u
        .f_mul_scalar(-2.0 * m.kb * (1.0 - m.kb) / kg)?
        .f_sub_(&v.f_mul_scalar(2.0 * m.kr * (1.0 - m.kr) / kg)?)?;
    let cb = u.f_mul_scalar(2.0 * (1.0 - m.kb))?;
    // 2x upsampling by repetition: nearest-neighbour on a channels-last (1, 3, ch, cw) view,
    // back to (2ch, 2cw, 3).
    let mut rgb = Tensor::f_stack(&[cr, cg, cb], 2)?
        .f_permute([2, 0, 1])?
        .f_unsqueeze(0)?
        .f_upsample_nearest2d([ch * 2, cw * 2], None, None)?
        .f_squeeze_dim(0)?
        .f_permute([1, 2, 0])?
        .f_narrow(0, 0, lh)?
        .f_narrow(1, 0, lw)?;
    rgb.f_add_(&y.f_unsqueeze(2)?)?
        .f_narrow(0, crop.y - y0, crop.h)?
        .f_narrow(1, crop.x - x0, crop.w)?
        .f_round()?
        .f_clamp_(0.0, 255.0)?
        .f_to_kind(Kind::Uint8)?
        // Interleaved (h, w, 3) memory, as for packed input (the upsampling may return planes).
        .f_contiguous()
}

/// Uploads the `crop` region of a packed frame to `device` as an owned u8 tensor (h, w, 3) RGB.
pub fn upload_rgb(
    data: &[u8],
    stride: usize,
    width: u32,
    height: u32,
    layout: PixelLayout,
    crop: Crop,
    device: Device,
) -> Result<Tensor, TchError> {
    check_len(data.len(), stride, width, height, layout.bpp)?;
    if crop.x < 0
        || crop.y < 0
        || crop.w <= 0
        || crop.h <= 0
        || crop.x + crop.w > width as i64
        || crop.y + crop.h > height as i64
    {
        return Err(TchError::Convert(format!(
            "crop {crop:?} outside {width}x{height}"
        )));
    }
    // SAFETY: `data` holds at least (height-1)*stride + width*bpp bytes (checked above), so every
    // element of the (height, width, bpp) view with strides (stride, bpp, 1) lies inside it. The
    // view is only read by copy_ below and dropped before this function returns, while `data`
    // is still borrowed.
    let blob = unsafe {
        Tensor::f_from_blob(
            data.as_ptr(),
            &[height as i64, width as i64, layout.bpp],
            &[stride as i64, layout.bpp, 1],
            Kind::Uint8,
            Device::Cpu,
        )?
    };
    let region = blob
        .f_narrow(0, crop.y, crop.h)?
        .f_narrow(1, crop.x, crop.w)?
        .f_narrow(2, layout.first, 3)?;
    let mut dst = Tensor::f_empty([crop.h, crop.w, 3], (Kind::Uint8, device))?;
    dst.f_copy_(&region)?;
    drop(region);
    drop(blob);
    if layout.bgr { dst.f_flip([2]) } else { Ok(dst) }
}

/// One input frame as mapped: its planes (1 for packed RGB, 2 for NV12, 3 for I420), their
/// strides, its size and how its bytes are laid out.
#[derive(Clone, Copy, Debug)]
pub struct FrameIn<'a> {
    pub planes: &'a [&'a [u8]],
    pub strides: &'a [usize],
    pub width: u32,
    pub height: u32,
    pub format: InFormat,
}

/// How an input frame's bytes are laid out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InFormat {
    Packed(PixelLayout),
    Yuv420 { nv12: bool, matrix: YuvMatrix },
}

impl FrameIn<'_> {
    /// The `crop` region as u8 (h, w, 3) RGB on `device` (see [`upload_rgb`] and
    /// [`upload_yuv420`]).
    pub fn upload(&self, crop: Crop, device: Device) -> Result<Tensor, TchError> {
        match self.format {
            InFormat::Packed(layout) => match (self.planes.first(), self.strides.first()) {
                (Some(data), Some(stride)) => {
                    upload_rgb(data, *stride, self.width, self.height, layout, crop, device)
                }
                _ => Err(TchError::Convert("no plane".into())),
            },
            InFormat::Yuv420 { nv12, matrix } => upload_yuv420(
                self.planes,
                self.strides,
                self.width,
                self.height,
                nv12,
                matrix,
                crop,
                device,
            ),
        }
    }

    /// The pipeline frame (1, out_h, out_w, 3) float [0, 1] of the cover-crop of this frame.
    /// A packed frame on the CPU that needs no scaling is converted in one pass into the
    /// reused `staging` tensor (no upload copy, no allocation); anything else is uploaded and
    /// converted on the device ([`to_frame`]). Both give the same values (u8 × (1/255) in f32).
    pub fn to_frame(
        &self,
        staging: &mut Staging,
        out_w: u32,
        out_h: u32,
        device: Device,
    ) -> Result<Tensor, TchError> {
        let crop = cover_crop(self.width, self.height, out_w, out_h);
        if let (InFormat::Packed(layout), Device::Cpu, Some(data), Some(stride)) = (
            self.format,
            device,
            self.planes.first(),
            self.strides.first(),
        ) && (crop.w, crop.h) == (out_w as i64, out_h as i64)
        {
            check_len(data.len(), *stride, self.width, self.height, layout.bpp)?;
            let t = staging.input(out_w, out_h)?;
            let n = out_w as usize * out_h as usize * 3;
            // SAFETY: `t` is a contiguous (1, out_h, out_w, 3) float CPU tensor owned by
            // `staging` (n elements); no other view of it is alive (the previous frame's uses
            // ended before this call), and the slice is dropped before `t` is returned.
            let dst = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) };
            packed_to_float(data, *stride, layout, crop, dst);
            return Ok(t.shallow_clone());
        }
        to_frame(&self.upload(crop, device)?, out_w, out_h)
    }
}

/// Buffers reused from frame to frame by one inference thread (or child): the CPU tensor a
/// packed input is converted into.
#[derive(Default)]
pub struct Staging {
    input: Option<Tensor>,
}

impl Staging {
    /// The (1, h, w, 3) float CPU staging tensor, made when the size changes.
    fn input(&mut self, w: u32, h: u32) -> Result<&Tensor, TchError> {
        let shape = [1, h as i64, w as i64, 3];
        if self.input.as_ref().is_none_or(|t| t.size() != shape) {
            self.input = Some(Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?);
        }
        self.input
            .as_ref()
            .ok_or_else(|| TchError::Convert("no staging tensor".into()))
    }
}

/// 1/255 as torch's `mul_scalar(1.0 / 255.0)` uses it on f32 (the f64 scalar cast to f32).
const INV_255: f32 = (1.0f64 / 255.0) as f32;

/// Packed 8-bit pixels of `crop` (lengths checked by the caller) to tightly packed RGB floats
/// in [0, 1], in row chunks on torch's threads ([`par`]).
fn packed_to_float(data: &[u8], stride: usize, layout: PixelLayout, crop: Crop, dst: &mut [f32]) {
    // Each element: one byte read, four written.
    par::for_row_chunks(dst, crop.w as usize * 3, dst.len() * 5, |first, rows| {
        let crop = Crop {
            y: crop.y + first as i64,
            ..crop
        };
        packed_rows_to_float(data, stride, layout, crop, rows)
    });
}

/// [`packed_to_float`] on the calling thread, for as many rows of `crop` as `dst` holds.
fn packed_rows_to_float(
    data: &[u8],
    stride: usize,
    layout: PixelLayout,
    crop: Crop,
    dst: &mut [f32],
) {
    let (bpp, first) = (layout.bpp as usize, layout.first as usize);
    let (x, y, w) = (crop.x as usize, crop.y as usize, crop.w as usize);
    for (r, drow) in dst.chunks_exact_mut(w * 3).enumerate() {
        let start = (y + r) * stride + x * bpp;
        let Some(src) = data.get(start..start + w * bpp) else {
            return;
        };
        if bpp == 3 && !layout.bgr {
            bytes_to_float(src, drow);
        } else {
            let (ri, bi) = if layout.bgr { (2, 0) } else { (0, 2) };
            for (d, s) in drow.chunks_exact_mut(3).zip(src.chunks_exact(bpp)) {
                let s = &s[first..first + 3];
                d[0] = s[ri] as f32 * INV_255;
                d[1] = s[1] as f32 * INV_255;
                d[2] = s[bi] as f32 * INV_255;
            }
        }
    }
}

/// `dst[i] = src[i] / 255` (as `u8 × INV_255`), with AVX2 where the CPU has it (1.6× here;
/// the plain version is what the compiler makes of the same loop for baseline x86-64).
fn bytes_to_float(src: &[u8], dst: &mut [f32]) {
    #[inline(always)]
    fn body(src: &[u8], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s as f32 * INV_255;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn avx2(src: &[u8], dst: &mut [f32]) {
            body(src, dst)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { avx2(src, dst) };
        }
    }
    body(src, dst)
}

/// `dst[i] = float_to_u8(src[i])`, with AVX2 where the CPU has it (as [`bytes_to_float`]).
fn floats_to_bytes(src: &[f32], dst: &mut [u8]) {
    #[inline(always)]
    fn body(src: &[f32], dst: &mut [u8]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = float_to_u8(*s);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn avx2(src: &[f32], dst: &mut [u8]) {
            body(src, dst)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { avx2(src, dst) };
        }
    }
    body(src, dst)
}

/// Clamped to [0, 1], × 255, rounded half to even (as torch's `round`): for v in [0, 255],
/// v + 1.5 × 2²³ has a unit last place, so the default rounding mode leaves round(v) in the
/// low mantissa bits, read by a bit cast. Unlike `round_ties_even` (a libm call without
/// SSE4.1) and a saturating `as u8`, this vectorises: 4× faster here.
#[inline(always)]
fn float_to_u8(v: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0;
    (v.clamp(0.0, 1.0) * 255.0 + MAGIC).to_bits() as u8
}

/// Writes a (1, H, W, 3) float [0, 1] frame (the model's output) into a packed
/// RGB/RGBx/RGBA plane: clamped, rounded, the fourth byte 255. A contiguous float CPU frame
/// is written in one pass; any other goes through [`frame_to_u8`] and [`download_rgb`].
pub fn write_frame(
    frame: &Tensor,
    data: &mut [u8],
    stride: usize,
    width: u32,
    height: u32,
    bpp: i64,
) -> Result<(), TchError> {
    let (w, h) = (width as usize, height as usize);
    if frame.device() != Device::Cpu
        || frame.kind() != Kind::Float
        || frame.size() != [1, h as i64, w as i64, 3]
    {
        return download_rgb(&frame_to_u8(frame)?, data, stride, width, height, bpp);
    }
    check_len(data.len(), stride, width, height, bpp)?;
    let frame = frame.f_contiguous()?;
    // SAFETY: a contiguous float CPU tensor of 1 * h * w * 3 elements (checked above), alive
    // (`frame`) for the whole use of the slice.
    let src = unsafe { std::slice::from_raw_parts(frame.data_ptr() as *const f32, w * h * 3) };
    let bpp = bpp as usize;
    let len = (h * stride).min(data.len());
    let data = &mut data[..len];
    // Each element: four bytes read, one written; in row chunks on torch's threads.
    par::for_row_chunks(data, stride, w * h * 3 * 5, |first, rows| {
        let src = src.get(first * w * 3..).unwrap_or_default();
        for (srow, drow) in src.chunks_exact(w * 3).zip(rows.chunks_mut(stride)) {
            let drow = &mut drow[..w * bpp];
            if bpp == 3 {
                floats_to_bytes(srow, drow);
            } else {
                for (d, s) in drow.chunks_exact_mut(bpp).zip(srow.chunks_exact(3)) {
                    d[0] = float_to_u8(s[0]);
                    d[1] = float_to_u8(s[1]);
                    d[2] = float_to_u8(s[2]);
                    d[3] = 255;
                }
            }
        }
    });
    Ok(())
}

/// Scales a u8 (h, w, 3) RGB tensor to (out_h, out_w, 3) u8: bilinear, antialiased when
/// shrinking. On the CPU this runs torch's uint8 channels-last kernels (no float round trip);
/// on CUDA (no uint8 kernels there) it goes through float and rounds.
pub fn resize_u8(rgb: &Tensor, out_w: u32, out_h: u32) -> Result<Tensor, TchError> {
    let size = rgb.size();
    let (h, w) = (size[0], size[1]);
    let (oh, ow) = (out_h as i64, out_w as i64);
    if (h, w) == (oh, ow) {
        return Ok(rgb.shallow_clone());
    }
    let shrink = oh < h || ow < w;
    // (1, 3, h, w) view with channels-last strides.
    let x = rgb.f_permute([2, 0, 1])?.f_unsqueeze(0)?;
    let scale = |x: &Tensor| {
        if shrink {
            x.f_internal_upsample_bilinear2d_aa([oh, ow], false, None, None)
        } else {
            x.f_upsample_bilinear2d([oh, ow], false, None, None)
        }
    };
    let y = if rgb.device() == Device::Cpu {
        scale(&x)?
    } else {
        scale(&x.f_to_kind(Kind::Float)?)?
            .f_round_()?
            .f_clamp_(0.0, 255.0)?
            .f_to_kind(Kind::Uint8)?
    };
    // Back to (H, W, 3); contiguous in memory when the kernel kept channels-last.
    y.f_squeeze_dim(0)?.f_permute([1, 2, 0])
}

/// The pipeline frame: (1, H, W, 3) float RGB in [0, 1] at out_w×out_h, from an uploaded crop.
pub fn to_frame(rgb: &Tensor, out_w: u32, out_h: u32) -> Result<Tensor, TchError> {
    // u8 / float scalar promotes to float: one pass.
    resize_u8(rgb, out_w, out_h)?
        .f_unsqueeze(0)?
        .f_mul_scalar(1.0 / 255.0)
}

/// The cover+cropped input as u8 (H, W, 3), without a float round trip when no scaling is
/// needed (noop and pass-through frames).
pub fn to_u8_frame(rgb: Tensor, out_w: u32, out_h: u32) -> Result<Tensor, TchError> {
    resize_u8(&rgb, out_w, out_h)
}

/// (1, H, W, 3) float in [0, 1] to u8 (H, W, 3), clamped to [0, 1] first and rounded.
pub fn frame_to_u8(frame: &Tensor) -> Result<Tensor, TchError> {
    frame
        .f_squeeze_dim(0)?
        .f_clamp(0.0, 1.0)?
        .f_mul_scalar_(255.0)?
        .f_round_()?
        .f_to_kind(Kind::Uint8)
}

/// Writes u8 (H, W, 3) RGB (on any device) into a packed RGB/RGBx/RGBA plane on the CPU.
/// The fourth byte, if any, is set to 255.
pub fn download_rgb(
    rgb: &Tensor,
    data: &mut [u8],
    stride: usize,
    width: u32,
    height: u32,
    bpp: i64,
) -> Result<(), TchError> {
    check_len(data.len(), stride, width, height, bpp)?;
    let size = rgb.size();
    if size != [height as i64, width as i64, 3] || rgb.kind() != Kind::Uint8 {
        return Err(TchError::Convert(format!(
            "output tensor {size:?} {:?} does not fit a {width}x{height} frame",
            rgb.kind()
        )));
    }
    // SAFETY: as in upload_rgb, the view covers only bytes inside `data` (length checked), which
    // is exclusively borrowed for the whole lifetime of the view; the view is dropped before
    // returning.
    let blob = unsafe {
        Tensor::f_from_blob(
            data.as_mut_ptr(),
            &[height as i64, width as i64, bpp],
            &[stride as i64, bpp, 1],
            Kind::Uint8,
            Device::Cpu,
        )?
    };
    let mut colour = blob.f_narrow(2, 0, 3)?;
    colour.f_copy_(rgb)?;
    if bpp == 4 {
        let _alpha = blob.f_narrow(2, 3, 1)?.f_fill_(255)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_crop_geometry() {
        assert_eq!(
            cover_crop(640, 480, 384, 384),
            Crop {
                x: 80,
                y: 0,
                w: 480,
                h: 480
            }
        );
        assert_eq!(
            cover_crop(480, 640, 512, 512),
            Crop {
                x: 0,
                y: 80,
                w: 480,
                h: 480
            }
        );
        assert_eq!(
            cover_crop(512, 512, 512, 512),
            Crop {
                x: 0,
                y: 0,
                w: 512,
                h: 512
            }
        );
        assert_eq!(
            cover_crop(1280, 720, 512, 384),
            Crop {
                x: 160,
                y: 0,
                w: 960,
                h: 720
            }
        );
        assert_eq!(
            cover_crop(100, 1000, 512, 512),
            Crop {
                x: 0,
                y: 450,
                w: 100,
                h: 100
            }
        );
    }

    #[test]
    fn upload_download_round_trip_bgrx_with_stride() {
        let (w, h, stride) = (4u32, 2u32, 20usize);
        let mut src = vec![0u8; stride * h as usize];
        for y in 0..h as usize {
            for x in 0..w as usize {
                let o = y * stride + x * 4;
                src[o..o + 4].copy_from_slice(&[x as u8, y as u8, 200, 7]); // B, G, R, x
            }
        }
        let layout = pixel_layout(VideoFormat::Bgrx).unwrap();
        let crop = Crop {
            x: 1,
            y: 0,
            w: 2,
            h: 2,
        };
        let t = upload_rgb(&src, stride, w, h, layout, crop, Device::Cpu).unwrap();
        let mut out = vec![0u8; 2 * 2 * 3];
        download_rgb(&t, &mut out, 6, 2, 2, 3).unwrap();
        assert_eq!(out, [200, 0, 1, 200, 0, 2, 200, 1, 1, 200, 1, 2]);
        let f = to_frame(&t, 2, 2).unwrap();
        let back = frame_to_u8(&f).unwrap();
        let mut out2 = vec![0u8; 2 * 2 * 4];
        download_rgb(&back, &mut out2, 8, 2, 2, 4).unwrap();
        assert_eq!(&out2[0..4], &[200, 0, 1, 255]);
    }

    /// A packed `format` frame converted by the one-pass CPU path and by the torch path
    /// (upload, then `to_frame`), at its own size: (fast, torch). `staging` may be reused.
    fn both_input_paths(
        staging: &mut Staging,
        src: &[u8],
        stride: usize,
        w: u32,
        h: u32,
        format: VideoFormat,
    ) -> (Tensor, Tensor) {
        let input = FrameIn {
            planes: &[src],
            strides: &[stride],
            width: w,
            height: h,
            format: InFormat::Packed(pixel_layout(format).unwrap()),
        };
        let fast = input.to_frame(staging, w, h, Device::Cpu).unwrap();
        let crop = cover_crop(w, h, w, h);
        let slow = to_frame(&input.upload(crop, Device::Cpu).unwrap(), w, h).unwrap();
        (fast, slow)
    }

    /// The one-pass CPU conversions give exactly what the torch path gives.
    #[test]
    fn cpu_fast_paths_match_the_torch_path() {
        let (w, h, stride) = (6u32, 4u32, 28usize);
        let src: Vec<u8> = (0..stride * h as usize)
            .map(|i| (i * 37 % 256) as u8)
            .collect();
        let mut staging = Staging::default();
        for f in [VideoFormat::Bgrx, VideoFormat::Rgb, VideoFormat::Xrgb] {
            let (fast, slow) = both_input_paths(&mut staging, &src, stride, w, h, f);
            assert!(fast.equal(&slow), "{f:?}");
        }
        // Out of range, NaN-free values, exact halves (ties go to even, as torch's round).
        let vals: Vec<f32> = (0..(w * h * 3) as usize)
            .map(|i| match i % 5 {
                0 => -0.5,
                1 => 1.7,
                2 => (i as f32 + 0.5) / 255.0,
                _ => (i as f32 * 0.013) % 1.0,
            })
            .chain([2.5 / 255.0, 3.5 / 255.0, 0.5])
            .take((w * h * 3) as usize)
            .collect();
        let t = Tensor::from_slice(&vals).view([1, h as i64, w as i64, 3]);
        for bpp in [3i64, 4] {
            let ostride = w as usize * bpp as usize + 8;
            let mut fast = vec![0u8; ostride * h as usize];
            let mut slow = fast.clone();
            write_frame(&t, &mut fast, ostride, w, h, bpp).unwrap();
            download_rgb(&frame_to_u8(&t).unwrap(), &mut slow, ostride, w, h, bpp).unwrap();
            assert_eq!(fast, slow, "bpp {bpp}");
        }
    }

    /// Frames large enough to be converted in row chunks on torch's threads ([`par`]) give
    /// exactly what the torch path gives, with the loops on and off.
    #[test]
    fn large_frames_convert_the_same_in_chunks() {
        let (w, h) = (520u32, 300u32);
        assert!(par::threads_for((w * h * 15) as usize) >= 1);
        for f in [VideoFormat::Rgb, VideoFormat::Bgrx] {
            let layout = pixel_layout(f).unwrap();
            let stride = w as usize * layout.bpp as usize + 12;
            let src: Vec<u8> = (0..stride * h as usize)
                .map(|i| (i * 131 % 256) as u8)
                .collect();
            let (fast, slow) = both_input_paths(&mut Staging::default(), &src, stride, w, h, f);
            assert!(fast.equal(&slow), "{f:?}");
            // Output: values all over [−0.2, 1.2] from the frame itself.
            let y = (fast * 1.4 - 0.2).contiguous();
            for bpp in [3i64, 4] {
                let ostride = w as usize * bpp as usize + 4;
                let mut want = vec![0u8; ostride * h as usize];
                download_rgb(&frame_to_u8(&y).unwrap(), &mut want, ostride, w, h, bpp).unwrap();
                for on in [true, false] {
                    par::set_enabled(on);
                    let mut got = vec![0u8; ostride * h as usize];
                    write_frame(&y, &mut got, ostride, w, h, bpp).unwrap();
                    par::set_enabled(true);
                    assert!(got == want, "{f:?} bpp {bpp} parallel {on}");
                }
            }
        }
    }

    #[test]
    fn short_plane_is_an_error_not_ub() {
        let layout = pixel_layout(VideoFormat::Rgb).unwrap();
        let crop = Crop {
            x: 0,
            y: 0,
            w: 4,
            h: 4,
        };
        assert!(upload_rgb(&[0u8; 10], 12, 4, 4, layout, crop, Device::Cpu).is_err());
    }
}
