//! Relay buffers kept for reuse. A client gives its buffers back between transactions (an
//! idle client holds none); the next transaction, on whichever client, takes them from here
//! instead of from the allocator. Per thread, so taking and giving back take no lock.

use bytes::BytesMut;
use std::cell::RefCell;

/// Size of a fresh buffer: one read's worth (see `Pipe::read_buf`).
pub const CHUNK: usize = 8 * 1024;
/// Buffers a thread keeps: enough for the transactions in flight on it at once, small
/// enough not to matter (512 KiB) when every client is idle.
const KEPT: usize = 64;
/// Buffers that grew past this for a long result are freed, not kept.
const LARGEST_KEPT: usize = 2 * CHUNK;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least `CHUNK` bytes.
#[inline]
pub fn take() -> BytesMut {
    FREE.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| BytesMut::with_capacity(CHUNK))
}

/// Gives a buffer back for reuse (its contents are dropped).
#[inline]
pub fn give(mut buf: BytesMut) {
    buf.clear();
    // A buffer that grew large goes back to the allocator (asked for more than the largest
    // kept, `try_reclaim` reclaims the whole allocation: `capacity` alone only counts the room
    // behind what was consumed); so does one that cannot offer a whole chunk again. Reclaiming
    // the room consumed at the front allocates nothing.
    if buf.try_reclaim(LARGEST_KEPT + 1) || !buf.try_reclaim(CHUNK) {
        return;
    }
    FREE.with(|f| {
        let mut free = f.borrow_mut();
        if free.len() < KEPT {
            free.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    fn kept() -> usize {
        FREE.with(|f| f.borrow().len())
    }

    #[test]
    fn a_given_buffer_is_taken_again_empty_with_its_room() {
        let mut b = take();
        b.extend_from_slice(&[7; 100]);
        b.advance(50); // as a pipe consumes what it wrote
        let start = b.as_ptr() as usize - 50;
        give(b);
        let again = take();
        assert!(again.is_empty());
        assert!(again.capacity() >= CHUNK);
        assert_eq!(again.as_ptr() as usize, start, "the same allocation, reclaimed to its start");
    }

    #[test]
    fn a_buffer_grown_large_is_not_kept() {
        let before = kept();
        let mut b = BytesMut::with_capacity(LARGEST_KEPT * 2);
        b.extend_from_slice(&[1; 10]);
        give(b);
        assert_eq!(kept(), before);
    }

    #[test]
    fn a_large_buffer_consumed_almost_to_its_end_is_not_kept() {
        let before = kept();
        let mut b = BytesMut::with_capacity(LARGEST_KEPT * 8);
        b.resize(LARGEST_KEPT * 8 - CHUNK - 10, 1);
        b.advance(b.len()); // what is left behind it is a chunk's room, but the allocation is big
        give(b);
        assert_eq!(kept(), before);
    }

    #[test]
    fn at_most_kept_buffers_stay_per_thread() {
        let bufs: Vec<BytesMut> = (0..KEPT + 10).map(|_| BytesMut::with_capacity(CHUNK)).collect();
        bufs.into_iter().for_each(give);
        assert_eq!(kept(), KEPT);
    }
}
