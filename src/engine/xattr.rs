//! Extended attributes. An inode's attributes are one byte stream of entries
//! (`XattrEntryHeader` + name + value, back to back) held by its `Xattr` block: inside that
//! block when the stream fits (inline form, the common case of a few small attributes), else
//! cut into `XattrData` chunks that the `Xattr` block lists (indexed form). A change rewrites
//! the stream; chunks whose bytes did not change are kept, so appending one attribute copies
//! one chunk and the list. Callers hold the inode's write lock for changes and write the inode
//! back.

use zerocopy::{FromBytes, IntoBytes};

use super::pager::Blocks;
use super::txn::Tx;
use super::{Engine, block_off};
use crate::error::{Error, Result};
use crate::format::*;

/// How a set treats an existing attribute (XATTR_CREATE / XATTR_REPLACE).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SetMode {
    Any,
    Create,
    Replace,
}

type Attrs = Vec<(Vec<u8>, Vec<u8>)>;

/// An inode's attribute stream as stored: the `Xattr` block, its chunks (indexed form) and
/// the stream's bytes.
#[derive(Default)]
struct Stored {
    root: u64,
    chunks: Vec<u64>,
    stream: Vec<u8>,
}

impl Stored {
    fn blocks(&self) -> u64 {
        if self.root == 0 {
            0
        } else {
            1 + self.chunks.len() as u64
        }
    }
}

/// The entry stream of `attrs`.
fn encode(attrs: &Attrs) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in attrs {
        out.extend_from_slice(XattrEntryHeader::new(n.len(), v.len()).as_bytes());
        out.extend_from_slice(n);
        out.extend_from_slice(v);
    }
    out
}

/// Splits an entry stream; `Err` names what is wrong with it.
fn decode(stream: &[u8]) -> std::result::Result<Attrs, &'static str> {
    let mut out: Attrs = Vec::new();
    let mut names = 0;
    let mut p = 0;
    while p < stream.len() {
        let Ok((e, _)) = XattrEntryHeader::read_from_prefix(&stream[p..]) else {
            return Err("truncated entry");
        };
        let n = usize::from(e.name_len);
        let v = e.value_len();
        let start = p + XATTR_ENTRY_HEADER_SIZE;
        if n == 0 || v > XATTR_VALUE_MAX || start + n + v > stream.len() {
            return Err("entry bounds");
        }
        let name = &stream[start..start + n];
        names += n + 1;
        if names > XATTR_NAMES_MAX || out.iter().any(|(x, _)| x == name) {
            return Err("duplicate or too many names");
        }
        out.push((name.to_vec(), stream[start + n..start + n + v].to_vec()));
        p = start + n + v;
    }
    Ok(out)
}

impl Engine {
    fn xattr_read(&self, rec: &Inode) -> Result<Stored> {
        let root = rec.xattr_block.get();
        if root == 0 {
            return Ok(Stored::default());
        }
        self.check_block(root, "xattr block")?;
        self.expect_kind(root, BlockKind::Xattr, None)?;
        let bytes = self.img.bytes(block_off(root), PAYLOAD_SIZE as usize)?;
        let h = XattrBlockHeader::read_from_bytes(&bytes[..XATTR_HEADER_SIZE])
            .map_err(|_| Error::corrupt("xattr header"))?;
        let used = h.used.get() as usize;
        let bad = |why: &str| self.corrupt(format!("xattr block {root}: {why}"));
        if h.magic.get() != XATTR_MAGIC {
            return Err(bad("bad magic"));
        }
        let (chunks, stream) = match h.form.get() {
            XATTR_FORM_INLINE if used <= XATTR_CAPACITY => (
                Vec::new(),
                bytes[XATTR_HEADER_SIZE..XATTR_HEADER_SIZE + used].to_vec(),
            ),
            XATTR_FORM_INDEXED if used <= XATTR_MAX_CHUNKS * XATTR_CHUNK => {
                let list = &bytes[XATTR_HEADER_SIZE..];
                let mut chunks = Vec::new();
                let mut stream = Vec::with_capacity(used);
                for i in 0..used.div_ceil(XATTR_CHUNK) {
                    let c = u64::from_le_bytes(list[i * 8..i * 8 + 8].try_into().unwrap());
                    self.check_block(c, "xattr chunk")?;
                    self.expect_kind(c, BlockKind::XattrData, None)?;
                    let n = (used - stream.len()).min(XATTR_CHUNK);
                    stream.extend_from_slice(self.img.bytes(block_off(c), n)?);
                    chunks.push(c);
                }
                (chunks, stream)
            }
            _ => return Err(bad("bad form or size")),
        };
        if crc32c::crc32c(&stream) != h.checksum.get() {
            return Err(bad("checksum mismatch"));
        }
        Ok(Stored {
            root,
            chunks,
            stream,
        })
    }

    fn xattr_load(&self, rec: &Inode) -> Result<(Stored, Attrs)> {
        let stored = self.xattr_read(rec)?;
        let attrs = decode(&stored.stream)
            .map_err(|why| self.corrupt(format!("xattr block {}: {why}", stored.root)))?;
        Ok((stored, attrs))
    }

    /// Replaces the stored stream `old` by the entries `attrs`. Reserves what it needs before
    /// changing anything, so it fails whole (`ENOSPC`) or succeeds.
    fn xattr_store(&self, tx: &Tx, rec: &mut Inode, old: &Stored, attrs: &Attrs) -> Result<()> {
        let stream = encode(attrs);
        let indexed = stream.len() > XATTR_CAPACITY;
        let n_chunks = if indexed {
            stream.len().div_ceil(XATTR_CHUNK)
        } else {
            0
        };
        if n_chunks > XATTR_MAX_CHUNKS {
            return Err(Error::NoSpace);
        }
        let new_blocks = if attrs.is_empty() {
            0
        } else {
            1 + n_chunks as u64
        };
        tx.reserve_more(new_blocks)?;
        let mut b = tx.blocks();
        let mut list = Vec::with_capacity(n_chunks);
        for (i, chunk) in stream.chunks(XATTR_CHUNK).take(n_chunks).enumerate() {
            let old_chunk = old.stream.chunks(XATTR_CHUNK).nth(i);
            let block = match old.chunks.get(i) {
                Some(&c) if old_chunk == Some(chunk) => c,
                Some(&c) => self.cow(&mut b, c, BlockKind::XattrData)?,
                None => self.new_block(&mut b, old.root, BlockKind::XattrData, 0)?,
            };
            if old_chunk != Some(chunk) {
                let mut payload = chunk.to_vec();
                payload.resize(XATTR_CHUNK, 0);
                self.img.write(block_off(block), &payload)?;
            }
            list.push(block);
        }
        for &c in old.chunks.iter().skip(n_chunks) {
            b.free(c, 1)?;
        }
        rec.blocks = (rec.blocks.get().saturating_sub(old.blocks()) + new_blocks).into();
        if attrs.is_empty() {
            if old.root != 0 {
                b.free(old.root, 1)?;
            }
            rec.xattr_block = 0.into();
            return Ok(());
        }
        let root = if old.root == 0 {
            self.new_block(&mut b, 0, BlockKind::Xattr, 0)?
        } else {
            self.cow(&mut b, old.root, BlockKind::Xattr)?
        };
        rec.xattr_block = root.into();
        let h = XattrBlockHeader {
            magic: XATTR_MAGIC.into(),
            used: (stream.len() as u32).into(),
            checksum: crc32c::crc32c(&stream).into(),
            form: if indexed {
                XATTR_FORM_INDEXED
            } else {
                XATTR_FORM_INLINE
            }
            .into(),
        };
        let mut payload = Vec::with_capacity(PAYLOAD_SIZE as usize);
        payload.extend_from_slice(h.as_bytes());
        if indexed {
            // Readers of older builds must refuse the image rather than misread this block.
            self.enable_incompat(INCOMPAT_XATTR_INDEXED);
            list.iter()
                .for_each(|c| payload.extend_from_slice(&c.to_le_bytes()));
        } else {
            payload.extend_from_slice(&stream);
        }
        payload.resize(PAYLOAD_SIZE as usize, 0);
        self.img.write(block_off(root), &payload)?;
        Ok(())
    }

    pub fn xattr_get(&self, rec: &Inode, name: &[u8]) -> Result<Vec<u8>> {
        self.xattr_load(rec)?
            .1
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(Error::NoAttr)
    }

    pub fn xattr_list(&self, rec: &Inode) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .xattr_load(rec)?
            .1
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    pub fn xattr_set(
        &self,
        tx: &Tx,
        rec: &mut Inode,
        name: &[u8],
        value: &[u8],
        mode: SetMode,
    ) -> Result<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(Error::Range);
        }
        if value.len() > XATTR_VALUE_MAX {
            return Err(Error::ArgTooBig);
        }
        let (stored, mut attrs) = self.xattr_load(rec)?;
        let pos = attrs.iter().position(|(n, _)| n == name);
        match (pos, mode) {
            (Some(_), SetMode::Create) => return Err(Error::Exists),
            (None, SetMode::Replace) => return Err(Error::NoAttr),
            (Some(i), _) => attrs[i].1 = value.to_vec(),
            (None, _) => {
                let names: usize = attrs.iter().map(|(n, _)| n.len() + 1).sum();
                if names + name.len() + 1 > XATTR_NAMES_MAX {
                    return Err(Error::NoSpace);
                }
                attrs.push((name.to_vec(), value.to_vec()));
            }
        }
        self.xattr_store(tx, rec, &stored, &attrs)
    }

    pub fn xattr_remove(&self, tx: &Tx, rec: &mut Inode, name: &[u8]) -> Result<()> {
        let (stored, mut attrs) = self.xattr_load(rec)?;
        let pos = attrs
            .iter()
            .position(|(n, _)| n == name)
            .ok_or(Error::NoAttr)?;
        attrs.remove(pos);
        self.xattr_store(tx, rec, &stored, &attrs)
    }

    /// Frees every block of an inode's attributes (the inode is being freed).
    pub(super) fn xattr_free(&self, tx: &Tx, rec: &Inode) -> Result<()> {
        let root = rec.xattr_block.get();
        if root == 0 {
            return Ok(());
        }
        // A damaged stream must not keep the inode from being freed: free what can be named.
        let blocks = match self.xattr_read(rec) {
            Ok(s) => std::iter::once(s.root).chain(s.chunks).collect(),
            Err(e) => {
                log::error!("inode's xattr block {root}: {e}; its chunks are left to fsck");
                vec![self.check_block(root, "xattr block")?]
            }
        };
        let mut b = tx.blocks();
        for block in blocks {
            b.free(block, 1)?;
        }
        Ok(())
    }

    /// The blocks of an inode's attributes (its `Xattr` block first), validated (fsck).
    pub(super) fn xattr_blocks(&self, rec: &Inode) -> Result<Vec<u64>> {
        let (s, _) = self.xattr_load(rec)?;
        Ok(std::iter::once(s.root).chain(s.chunks).collect())
    }
}
