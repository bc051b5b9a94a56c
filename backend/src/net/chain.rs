//! Walking a descriptor chain that a (possibly hostile) guest wrote.
//!
//! virtio-queue's own iterator stops silently on a loop or a bad index; we
//! need to know, so that the chain is completed with length 0 and counted.
//! Every descriptor and buffer is bounds-checked against the batch's
//! [`MemMap`], every running total uses `checked_add`, and a chain may hold
//! at most as many descriptors as its table (which bounds loops).

use super::guest::{DescTable, MemMap, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};

/// Cap on segments per chain, whatever the table size.
pub const MAX_CHAIN_SEGS: usize = 1024;

/// One guest buffer of a chain, resolved to host memory for the batch that
/// walked it (a `Seg` is never kept past its batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    pub(crate) host: *mut u8,
}

// SAFETY: `host` is dereferenced only by gather/scatter, within the batch
// that walked the chain and while that batch's MemMap borrows the memory.
// Workers keep Vec<Seg> as scratch and move it to their thread once; a
// stale Seg is overwritten by the next walk before any use.
unsafe impl Send for Seg {}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("head index is beyond the queue")]
    HeadOutOfRange,
    #[error("next index is beyond the descriptor table")]
    NextOutOfRange,
    #[error("descriptor table lies outside guest memory")]
    TableOutOfMemory,
    #[error("chain is longer than its table (loop)")]
    TooLong,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor but INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    #[error("indirect table has a bad length")]
    BadIndirectTable,
    #[error("write-only descriptor in a TX chain")]
    WriteOnlyOnTx,
    #[error("device-readable descriptor in an RX chain")]
    ReadableOnRx,
    #[error("buffer lies outside guest memory")]
    BufferOutOfMemory,
    #[error("chain length overflows")]
    LengthOverflow,
}

/// Which direction the chain is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Device reads (TX): all descriptors must be readable.
    Read,
    /// Device writes (RX): all descriptors must be writable.
    Write,
}

/// Walk the chain at `head` of `table`, appending its buffers to `segs`
/// (not cleared: RX collects several chains for one frame in one list, and
/// copying `Seg`s between lists stalled on store forwarding behind the
/// frame copies to guest memory). Returns the total byte length; on error
/// `segs` may hold part of the chain.
#[inline(always)]
pub(crate) fn walk<'m>(
    map: &MemMap<'m>,
    table: DescTable<'m>,
    head: u16,
    indirect_ok: bool,
    dir: Dir,
    segs: &mut Vec<Seg>,
) -> Result<u32, ChainError> {
    // The usual chain, one plain descriptor the right way round, is taken
    // here without the loop's bookkeeping (or a call); anything else, good
    // or bad, goes the whole way.
    if let Some(desc) = table.get(head) {
        let want = match dir {
            Dir::Read => 0,
            Dir::Write => DESC_F_WRITE,
        };
        if desc.flags & (DESC_F_NEXT | DESC_F_INDIRECT | DESC_F_WRITE) == want && desc.len > 0 {
            if let Some(host) = map.translate(desc.addr, desc.len as usize) {
                segs.push(Seg {
                    addr: desc.addr,
                    len: desc.len,
                    host,
                });
                return Ok(desc.len);
            }
        }
    }
    walk_chain(map, table, head, indirect_ok, dir, segs)
}

/// [`walk`] for any chain.
#[inline(never)]
fn walk_chain<'m>(
    map: &MemMap<'m>,
    table: DescTable<'m>,
    head: u16,
    indirect_ok: bool,
    dir: Dir,
    segs: &mut Vec<Seg>,
) -> Result<u32, ChainError> {
    if head >= table.entries() {
        return Err(ChainError::HeadOutOfRange);
    }
    let mut table = table;
    let mut index = head;
    let mut budget = usize::from(table.entries()).min(MAX_CHAIN_SEGS);
    let mut indirect = false;
    let mut total: u32 = 0;
    loop {
        if budget == 0 {
            return Err(ChainError::TooLong);
        }
        budget -= 1;
        let desc = table.get(index).ok_or(ChainError::NextOutOfRange)?;
        if desc.flags & DESC_F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            if !indirect_ok {
                return Err(ChainError::IndirectNotNegotiated);
            }
            let len = desc.len;
            if desc.flags & DESC_F_NEXT != 0 || len == 0 || len as usize % DESC_SIZE != 0 {
                return Err(ChainError::BadIndirectTable);
            }
            let entries = len as usize / DESC_SIZE;
            if entries > MAX_CHAIN_SEGS {
                return Err(ChainError::BadIndirectTable);
            }
            // The whole table must be guest memory.
            table = DescTable::new(map, desc.addr, entries as u16)
                .ok_or(ChainError::TableOutOfMemory)?;
            indirect = true;
            index = 0;
            budget = entries;
            continue;
        }
        let writable = desc.flags & DESC_F_WRITE != 0;
        match dir {
            Dir::Read if writable => return Err(ChainError::WriteOnlyOnTx),
            Dir::Write if !writable => return Err(ChainError::ReadableOnRx),
            _ => {}
        }
        let len = desc.len;
        if len > 0 {
            let host = map
                .translate(desc.addr, len as usize)
                .ok_or(ChainError::BufferOutOfMemory)?;
            total = total.checked_add(len).ok_or(ChainError::LengthOverflow)?;
            segs.push(Seg {
                addr: desc.addr,
                len,
                host,
            });
        }
        if desc.flags & DESC_F_NEXT == 0 {
            return Ok(total);
        }
        index = desc.next;
        if index >= table.entries() {
            return Err(ChainError::NextOutOfRange);
        }
    }
}

/// Copy the bytes of `segs`, skipping the first `skip`, into `out`, up to
/// its length. Returns bytes copied.
pub(crate) fn gather(map: &MemMap<'_>, segs: &[Seg], mut skip: usize, out: &mut [u8]) -> usize {
    let mut at = 0usize;
    for s in segs {
        if at == out.len() {
            break;
        }
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - at);
        map.read(s.host.wrapping_add(skip), &mut out[at..at + n]);
        at += n;
        skip = 0;
    }
    at
}

/// Append the bytes of `segs` after the first `skip` to `out`.
pub(crate) fn gather_into(map: &MemMap<'_>, segs: &[Seg], mut skip: usize, out: &mut Vec<u8>) {
    for s in segs {
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        map.read_into(s.host.wrapping_add(skip), len - skip, out);
        skip = 0;
    }
}

/// Copy `src` into the buffers of `segs` starting at byte `offset` of the
/// chain. Returns bytes written (less than `src.len()` when the chain is
/// full).
pub(crate) fn scatter(map: &MemMap<'_>, segs: &[Seg], mut offset: usize, src: &[u8]) -> usize {
    let mut done = 0usize;
    for s in segs {
        if done == src.len() {
            break;
        }
        let len = s.len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let room = len - offset;
        let n = room.min(src.len() - done);
        map.write(s.host.wrapping_add(offset), &src[done..done + n]);
        done += n;
        offset = 0;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const TABLE: u64 = 0x1000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    fn run(mem: &GuestMemoryMmap, head: u16, dir: Dir) -> Result<u32, ChainError> {
        walk_at(mem, head, true, dir, &mut Vec::new())
    }

    fn walk_at(
        mem: &GuestMemoryMmap,
        head: u16,
        indirect: bool,
        dir: Dir,
        segs: &mut Vec<Seg>,
    ) -> Result<u32, ChainError> {
        let map = MemMap::new(mem);
        let table = DescTable::new(&map, TABLE, 256).unwrap();
        walk(&map, table, head, indirect, dir, segs)
    }

    #[test]
    fn good_chain_and_copy() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 10, F_NEXT, 1);
        put(&m, TABLE, 1, 0x9000, 20, 0, 0);
        m.write_slice(&[7u8; 10], GuestAddress(0x8000)).unwrap();
        m.write_slice(&[9u8; 20], GuestAddress(0x9000)).unwrap();
        let mut segs = Vec::new();
        let n = walk_at(&m, 0, true, Dir::Read, &mut segs).unwrap();
        assert_eq!(n, 30);
        let mut out = [0u8; 30];
        assert_eq!(gather(&MemMap::new(&m), &segs, 5, &mut out), 25);
        assert_eq!(out[4], 7);
        assert_eq!(out[5], 9);
    }

    #[test]
    fn outside_memory_is_refused() {
        let m = mem();
        put(&m, TABLE, 0, 0xff_ff00, 0x1000, 0, 0);
        assert_eq!(run(&m, 0, Dir::Read), Err(ChainError::BufferOutOfMemory));
        put(&m, TABLE, 0, u64::MAX - 4, 64, 0, 0);
        assert_eq!(run(&m, 0, Dir::Read), Err(ChainError::BufferOutOfMemory));
    }

    #[test]
    fn loops_and_long_chains_are_refused() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 10, F_NEXT, 1);
        put(&m, TABLE, 1, 0x8000, 10, F_NEXT, 0);
        assert_eq!(run(&m, 0, Dir::Read), Err(ChainError::TooLong));
        // Self loop.
        put(&m, TABLE, 2, 0x8000, 10, F_NEXT, 2);
        assert_eq!(run(&m, 2, Dir::Read), Err(ChainError::TooLong));
    }

    #[test]
    fn indices_out_of_range() {
        let m = mem();
        assert_eq!(run(&m, 256, Dir::Read), Err(ChainError::HeadOutOfRange));
        put(&m, TABLE, 0, 0x8000, 10, F_NEXT, 300);
        assert_eq!(run(&m, 0, Dir::Read), Err(ChainError::NextOutOfRange));
    }

    #[test]
    fn direction_is_enforced() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 10, F_WRITE, 0);
        assert_eq!(run(&m, 0, Dir::Read), Err(ChainError::WriteOnlyOnTx));
        put(&m, TABLE, 0, 0x8000, 10, 0, 0);
        assert_eq!(run(&m, 0, Dir::Write), Err(ChainError::ReadableOnRx));
    }

    #[test]
    fn indirect_rules() {
        let m = mem();
        let ind = 0x4000;
        put(&m, ind, 0, 0x8000, 10, F_NEXT, 1);
        put(&m, ind, 1, 0x9000, 10, 0, 0);
        put(&m, TABLE, 0, ind, 32, F_INDIRECT, 0);
        assert_eq!(run(&m, 0, Dir::Read), Ok(20));
        assert_eq!(
            walk_at(&m, 0, false, Dir::Read, &mut Vec::new()),
            Err(ChainError::IndirectNotNegotiated)
        );
        // Nested indirect.
        put(&m, ind, 1, ind, 32, F_INDIRECT, 0);
        assert_eq!(run(&m, 0, Dir::Read), Err(ChainError::NestedIndirect));
        // Bad table length.
        put(&m, TABLE, 0, ind, 33, F_INDIRECT, 0);
        assert_eq!(run(&m, 0, Dir::Read), Err(ChainError::BadIndirectTable));
        // Indirect table outside memory.
        put(&m, TABLE, 0, 0xff_fff0, 64, F_INDIRECT, 0);
        assert_eq!(run(&m, 0, Dir::Read), Err(ChainError::TableOutOfMemory));
    }

    #[test]
    fn zero_length_descriptors_are_skipped() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 0, F_NEXT, 1);
        put(&m, TABLE, 1, 0x9000, 0, 0, 0);
        assert_eq!(run(&m, 0, Dir::Read), Ok(0));
    }

    #[test]
    fn length_overflow() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Two descriptors of ~4 GiB can't both be in 1 MiB of memory, so the
        // memory check fires first; this checks no panic on huge lengths.
        put(&m, TABLE, 0, 0x8000, u32::MAX, F_NEXT, 1);
        assert_eq!(run(&m, 0, Dir::Read), Err(ChainError::BufferOutOfMemory));
    }

    #[test]
    fn one_descriptor_shortcut_agrees_with_the_walk() {
        let m = mem();
        let map = MemMap::new(&m);
        let table = DescTable::new(&map, TABLE, 256).unwrap();
        for (flags, dir) in [
            (0, Dir::Read),
            (F_WRITE, Dir::Write),
            (F_WRITE, Dir::Read),
            (0, Dir::Write),
        ] {
            for (addr, len) in [(0x8000, 64), (0x8000, 0), (0xff_ffc0, 64), (0xff_ffc0, 65)] {
                put(&m, TABLE, 3, addr, len, flags, 0);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                assert_eq!(
                    walk(&map, table, 3, true, dir, &mut a),
                    walk_chain(&map, table, 3, true, dir, &mut b),
                    "{flags} {dir:?} {addr:#x}+{len}"
                );
                assert_eq!(a, b);
            }
        }
    }
}
