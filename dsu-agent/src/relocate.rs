//! Relocate: the arithmetic of x86_64 ELF relocations, as pure functions.
//!
//! Notation of the psABI: `S` symbol address, `A` addend, `P` address of the place being
//! patched, `G + GOT` address of the symbol's GOT slot. Every narrowing is checked; a value
//! out of range is an error, never a silent truncation.

use object::elf;
use thiserror::Error;

/// The relocation forms dsu applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `S + A`, 64 bits.
    Abs64,
    /// `S + A - P`, 64 bits.
    Pc64,
    /// `S + A - P`, signed 32 bits.
    Pc32,
    /// `L + A - P`: a call; `L` is the symbol or, when out of reach, a stub.
    Plt32,
    /// `S + A`, zero-extended 32 bits.
    Abs32,
    /// `S + A`, sign-extended 32 bits.
    Abs32S,
    /// `G + GOT + A - P`, signed 32 bits (also the relaxable `GOTPCRELX` forms, not relaxed).
    GotPcRel,
    /// `GOT + A - P`, signed 32 bits.
    GotPc32,
    /// General dynamic TLS: pc-relative to a GOT pair `{module id, offset}` for
    /// `__tls_get_addr`.
    TlsGd,
    /// Local dynamic TLS: pc-relative to a GOT pair `{module id, 0}`.
    TlsLd,
    /// Initial exec TLS: pc-relative to a GOT slot holding the offset from the thread pointer.
    GotTpOff,
    /// Offset of the variable in its module's TLS block, signed 32 bits.
    DtpOff32,
    /// Offset of the variable in its module's TLS block, 64 bits.
    DtpOff64,
}

impl Form {
    /// The form of a raw `r_type`, `None` when dsu does not support it.
    pub fn of(r_type: u32) -> Option<Form> {
        Some(match elf::RelocationType(r_type) {
            elf::R_X86_64_64 => Form::Abs64,
            elf::R_X86_64_PC64 => Form::Pc64,
            elf::R_X86_64_PC32 => Form::Pc32,
            elf::R_X86_64_PLT32 => Form::Plt32,
            elf::R_X86_64_32 => Form::Abs32,
            elf::R_X86_64_32S => Form::Abs32S,
            elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX => {
                Form::GotPcRel
            }
            elf::R_X86_64_GOTPC32 => Form::GotPc32,
            elf::R_X86_64_TLSGD => Form::TlsGd,
            elf::R_X86_64_TLSLD => Form::TlsLd,
            elf::R_X86_64_GOTTPOFF => Form::GotTpOff,
            elf::R_X86_64_DTPOFF32 => Form::DtpOff32,
            elf::R_X86_64_DTPOFF64 => Form::DtpOff64,
            _ => return None,
        })
    }

    /// Bytes written at the place.
    pub fn width(self) -> usize {
        match self {
            Form::Abs64 | Form::Pc64 | Form::DtpOff64 => 8,
            _ => 4,
        }
    }

    /// Whether it refers to a thread-local variable (its symbol value is a TLS offset).
    pub fn is_thread_local(self) -> bool {
        matches!(
            self,
            Form::TlsGd | Form::TlsLd | Form::GotTpOff | Form::DtpOff32 | Form::DtpOff64
        )
    }

    /// Whether the value depends on the distance to the symbol (a constraint on placement).
    pub fn is_pc_relative(self) -> bool {
        matches!(self, Form::Pc32 | Form::Plt32)
    }
}

/// The psABI name of a relocation type, for messages.
pub fn type_name(r_type: u32) -> String {
    let name = match elf::RelocationType(r_type) {
        elf::R_X86_64_NONE => "R_X86_64_NONE",
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_COPY => "R_X86_64_COPY",
        elf::R_X86_64_GLOB_DAT => "R_X86_64_GLOB_DAT",
        elf::R_X86_64_JUMP_SLOT => "R_X86_64_JUMP_SLOT",
        elf::R_X86_64_RELATIVE => "R_X86_64_RELATIVE",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_16 => "R_X86_64_16",
        elf::R_X86_64_PC16 => "R_X86_64_PC16",
        elf::R_X86_64_8 => "R_X86_64_8",
        elf::R_X86_64_PC8 => "R_X86_64_PC8",
        elf::R_X86_64_DTPMOD64 => "R_X86_64_DTPMOD64",
        elf::R_X86_64_DTPOFF64 => "R_X86_64_DTPOFF64",
        elf::R_X86_64_TPOFF64 => "R_X86_64_TPOFF64",
        elf::R_X86_64_TLSGD => "R_X86_64_TLSGD",
        elf::R_X86_64_TLSLD => "R_X86_64_TLSLD",
        elf::R_X86_64_DTPOFF32 => "R_X86_64_DTPOFF32",
        elf::R_X86_64_GOTTPOFF => "R_X86_64_GOTTPOFF",
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTOFF64 => "R_X86_64_GOTOFF64",
        elf::R_X86_64_GOTPC32 => "R_X86_64_GOTPC32",
        elf::R_X86_64_SIZE32 => "R_X86_64_SIZE32",
        elf::R_X86_64_SIZE64 => "R_X86_64_SIZE64",
        elf::R_X86_64_GOTPC32_TLSDESC => "R_X86_64_GOTPC32_TLSDESC",
        elf::R_X86_64_TLSDESC_CALL => "R_X86_64_TLSDESC_CALL",
        elf::R_X86_64_TLSDESC => "R_X86_64_TLSDESC",
        elf::R_X86_64_IRELATIVE => "R_X86_64_IRELATIVE",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        _ => return format!("relocation type {r_type}"),
    };
    name.to_string()
}

/// A relocation that could not be applied, with everything needed to find it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{r_type} against {symbol} at {section}+{offset:#x}: {reason}")]
pub struct RelocError {
    pub r_type: String,
    pub symbol: String,
    pub section: String,
    pub offset: u64,
    pub reason: RelocProblem,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RelocProblem {
    #[error("unsupported relocation type")]
    Unsupported,
    #[error("value {value:#x} does not fit in {bits} bits")]
    OutOfRange { value: i128, bits: u32 },
    #[error(
        "value {value:#x} does not fit in 32 bits: an absolute 32-bit address, which only code \
         linked below 2 GiB can use; compile the patch as position-independent code (-fPIC)"
    )]
    NotPic { value: i128 },
    #[error("the place lies outside the section (size {size:#x})")]
    OutsideSection { size: u64 },
    #[error("the symbol is not in a loaded section")]
    SymbolNotLoaded,
    #[error("the symbol is thread-local but the relocation is not a TLS one")]
    ThreadLocal,
    #[error("a TLS relocation against a symbol that is not thread-local")]
    NotThreadLocal,
    #[error(
        "initial-exec TLS access to a variable outside the static TLS block ({reason}); build the patch with -ftls-model=global-dynamic"
    )]
    NotStaticTls { reason: String },
}

/// Inputs of one relocation, as addresses in the running process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    /// `S`, or for `Plt32` the call target chosen (symbol or stub).
    pub symbol: u64,
    pub addend: i64,
    pub place: u64,
    /// `G + GOT`: the symbol's slot, for `GotPcRel`.
    pub got_slot: u64,
    /// `GOT`: the table's base, for `GotPc32`.
    pub got: u64,
}

/// The bytes to store at the place, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    U64(u64),
    U32(u32),
}

impl Value {
    pub fn write(self, into: &mut [u8]) {
        match self {
            Value::U64(v) => into[..8].copy_from_slice(&v.to_le_bytes()),
            Value::U32(v) => into[..4].copy_from_slice(&v.to_le_bytes()),
        }
    }
}

/// Computes the value of a relocation. Pure.
pub fn compute(form: Form, i: Inputs) -> Result<Value, RelocProblem> {
    let s = i128::from(i.symbol);
    let a = i128::from(i.addend);
    let p = i128::from(i.place);
    let value = match form {
        Form::Abs64 | Form::DtpOff64 => return Ok(Value::U64((s + a) as u64)),
        Form::Pc64 => return Ok(Value::U64((s + a - p) as u64)),
        Form::Pc32 | Form::Plt32 => s + a - p,
        Form::GotPcRel | Form::TlsGd | Form::TlsLd | Form::GotTpOff => {
            i128::from(i.got_slot) + a - p
        }
        Form::GotPc32 => i128::from(i.got) + a - p,
        Form::Abs32 => {
            let v = s + a;
            return u32::try_from(v)
                .map(Value::U32)
                .map_err(|_| RelocProblem::NotPic { value: v });
        }
        Form::Abs32S => {
            let v = s + a;
            return i32::try_from(v)
                .map(|v| Value::U32(v as u32))
                .map_err(|_| RelocProblem::NotPic { value: v });
        }
        Form::DtpOff32 => s + a,
    };
    i32::try_from(value)
        .map(|v| Value::U32(v as u32))
        .map_err(|_| RelocProblem::OutOfRange { value, bits: 32 })
}

/// Stores `value` at `offset` of a section of `size` bytes.
pub fn store(section: &mut [u8], offset: u64, value: Value) -> Result<(), RelocProblem> {
    let width = match value {
        Value::U64(_) => 8,
        Value::U32(_) => 4,
    };
    let size = section.len() as u64;
    let outside = || RelocProblem::OutsideSection { size };
    let start = usize::try_from(offset).map_err(|_| outside())?;
    let end = start.checked_add(width).ok_or_else(outside)?;
    let place = section.get_mut(start..end).ok_or_else(outside)?;
    value.write(place);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(symbol: u64, addend: i64, place: u64) -> Inputs {
        Inputs {
            symbol,
            addend,
            place,
            got_slot: 0,
            got: 0,
        }
    }

    #[test]
    fn pc32_is_symbol_plus_addend_minus_place() {
        // A call at 0x1000 whose rel32 field sits at 0x1001, to 0x2000: addend -4.
        let v = compute(Form::Plt32, inputs(0x2000, -4, 0x1001)).unwrap();
        assert_eq!(v, Value::U32(0x2000 - 4 - 0x1001));
    }

    #[test]
    fn pc32_backwards_is_negative() {
        let v = compute(Form::Pc32, inputs(0x1000, -4, 0x2000)).unwrap();
        assert_eq!(v, Value::U32((-0x1004i32) as u32));
    }

    #[test]
    fn pc32_out_of_range_is_refused() {
        let far = 0x7f00_0000_0000u64;
        let err = compute(Form::Pc32, inputs(far, -4, 0x5500_0000_0000)).unwrap_err();
        assert!(matches!(err, RelocProblem::OutOfRange { bits: 32, .. }));
    }

    #[test]
    fn absolute_32_bit_addresses_out_of_range_say_to_use_pic() {
        let far = 0x7f00_0000_0000u64;
        for form in [Form::Abs32, Form::Abs32S] {
            let err = compute(form, inputs(far, 0, 0)).unwrap_err();
            assert!(matches!(err, RelocProblem::NotPic { .. }), "{err}");
            assert!(err.to_string().contains("-fPIC"), "{err}");
        }
        assert_eq!(
            compute(Form::Abs32S, inputs(0x1000, -8, 0)).unwrap(),
            Value::U32(0xff8)
        );
    }

    #[test]
    fn pc32_limits_are_exact() {
        let p = 0x1_0000_0000u64;
        assert!(compute(Form::Pc32, inputs(p + 0x7fff_ffff, 0, p)).is_ok());
        assert!(compute(Form::Pc32, inputs(p + 0x8000_0000, 0, p)).is_err());
        assert!(compute(Form::Pc32, inputs(p - 0x8000_0000, 0, p)).is_ok());
        assert!(compute(Form::Pc32, inputs(p - 0x8000_0001, 0, p)).is_err());
    }

    #[test]
    fn abs64_wraps_addend() {
        let v = compute(Form::Abs64, inputs(0x5555_0000_1000, 0x10, 0)).unwrap();
        assert_eq!(v, Value::U64(0x5555_0000_1010));
        let v = compute(Form::Abs64, inputs(0x1000, -0x10, 0)).unwrap();
        assert_eq!(v, Value::U64(0xff0));
    }

    #[test]
    fn abs32_and_abs32s_check_their_ranges() {
        assert_eq!(
            compute(Form::Abs32, inputs(0xffff_fff0, 0xf, 0)).unwrap(),
            Value::U32(0xffff_ffff)
        );
        assert!(compute(Form::Abs32, inputs(0xffff_fff0, 0x10, 0)).is_err());
        assert!(compute(Form::Abs32S, inputs(0x7fff_ffff, 0, 0)).is_ok());
        assert!(compute(Form::Abs32S, inputs(0x8000_0000, 0, 0)).is_err());
        assert!(compute(Form::Abs32, inputs(0x5555_0000_0000, 0, 0)).is_err());
    }

    #[test]
    fn gotpcrel_uses_the_slot_not_the_symbol() {
        let i = Inputs {
            symbol: 0x7f00_0000_0000,
            addend: -4,
            place: 0x1000,
            got_slot: 0x3000,
            got: 0x2ff8,
        };
        assert_eq!(
            compute(Form::GotPcRel, i).unwrap(),
            Value::U32(0x3000 - 4 - 0x1000)
        );
        assert_eq!(
            compute(Form::GotPc32, i).unwrap(),
            Value::U32(0x2ff8 - 4 - 0x1000)
        );
    }

    #[test]
    fn forms_of_raw_types() {
        assert_eq!(
            Form::of(elf::R_X86_64_REX_GOTPCRELX.0),
            Some(Form::GotPcRel)
        );
        assert_eq!(Form::of(elf::R_X86_64_GOTPCRELX.0), Some(Form::GotPcRel));
        assert_eq!(Form::of(elf::R_X86_64_PLT32.0), Some(Form::Plt32));
        assert_eq!(Form::of(elf::R_X86_64_TPOFF32.0), None);
        assert_eq!(Form::of(elf::R_X86_64_TLSGD.0), Some(Form::TlsGd));
        assert!(
            Form::of(elf::R_X86_64_GOTTPOFF.0)
                .unwrap()
                .is_thread_local()
        );
        assert_eq!(type_name(elf::R_X86_64_GOTTPOFF.0), "R_X86_64_GOTTPOFF");
        assert_eq!(type_name(999), "relocation type 999");
    }

    #[test]
    fn tls_forms_address_their_got_entries_or_offsets() {
        let i = Inputs {
            symbol: 0x10,
            addend: -4,
            place: 0x1000,
            got_slot: 0x3000,
            got: 0,
        };
        for form in [Form::TlsGd, Form::TlsLd, Form::GotTpOff] {
            assert_eq!(compute(form, i).unwrap(), Value::U32(0x3000 - 4 - 0x1000));
        }
        let i = Inputs { addend: 8, ..i };
        assert_eq!(compute(Form::DtpOff32, i).unwrap(), Value::U32(0x18));
        assert_eq!(compute(Form::DtpOff64, i).unwrap(), Value::U64(0x18));
    }

    #[test]
    fn store_checks_bounds() {
        let mut s = [0u8; 6];
        store(&mut s, 2, Value::U32(0x0403_0201)).unwrap();
        assert_eq!(s, [0, 0, 1, 2, 3, 4]);
        assert!(store(&mut s, 3, Value::U32(1)).is_err());
        assert!(store(&mut s, u64::MAX, Value::U32(1)).is_err());
        assert!(store(&mut s, 0, Value::U64(1)).is_err());
    }
}
