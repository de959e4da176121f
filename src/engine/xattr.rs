//! Extended attributes: all of an inode's attributes packed in one metadata block (kind
//! `Xattr`): `XattrBlockHeader`, then entries `XattrEntryHeader` + name + value. A change
//! rewrites the block (a new one unless the running transaction wrote it). Callers hold the
//! inode's write lock for changes and write the inode back.

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

impl Engine {
    fn xattr_load(&self, rec: &Inode) -> Result<Attrs> {
        let b = rec.xattr_block.get();
        if b == 0 {
            return Ok(Vec::new());
        }
        self.check_block(b, "xattr block")?;
        self.expect_kind(b, BlockKind::Xattr, None)?;
        let bytes = self.img.bytes(block_off(b), PAYLOAD_SIZE as usize)?;
        let h = XattrBlockHeader::read_from_bytes(&bytes[..XATTR_HEADER_SIZE])
            .map_err(|_| Error::corrupt("xattr header"))?;
        let used = h.used.get() as usize;
        if h.magic.get() != XATTR_MAGIC || used > XATTR_CAPACITY {
            return Err(self.corrupt(format!("xattr block {b} header")));
        }
        let body = &bytes[XATTR_HEADER_SIZE..XATTR_HEADER_SIZE + used];
        if crc32c::crc32c(body) != h.checksum.get() {
            return Err(self.corrupt(format!("xattr block {b} checksum mismatch")));
        }
        let mut out = Vec::new();
        let mut p = 0;
        while p < body.len() {
            if p + XATTR_ENTRY_HEADER_SIZE > body.len() {
                return Err(self.corrupt(format!("xattr block {b} truncated entry")));
            }
            let e = XattrEntryHeader::read_from_bytes(&body[p..p + XATTR_ENTRY_HEADER_SIZE])
                .map_err(|_| Error::corrupt("xattr entry"))?;
            let n = usize::from(e.name_len);
            let v = usize::from(e.value_len.get());
            let start = p + XATTR_ENTRY_HEADER_SIZE;
            if n == 0 || start + n + v > body.len() {
                return Err(self.corrupt(format!("xattr block {b} entry bounds")));
            }
            out.push((
                body[start..start + n].to_vec(),
                body[start + n..start + n + v].to_vec(),
            ));
            p = start + n + v;
        }
        Ok(out)
    }

    fn xattr_store(&self, tx: &Tx, rec: &mut Inode, attrs: &Attrs) -> Result<()> {
        let mut body = Vec::new();
        for (n, v) in attrs {
            let h = XattrEntryHeader {
                name_len: n.len() as u8,
                reserved: 0,
                value_len: (v.len() as u16).into(),
            };
            body.extend_from_slice(h.as_bytes());
            body.extend_from_slice(n);
            body.extend_from_slice(v);
        }
        if body.len() > XATTR_CAPACITY {
            return Err(Error::NoSpace);
        }
        let mut b = tx.blocks();
        let old = rec.xattr_block.get();
        if attrs.is_empty() {
            if old != 0 {
                b.free(old, 1)?;
                rec.xattr_block = 0.into();
                rec.blocks = rec.blocks.get().saturating_sub(1).into();
            }
            return Ok(());
        }
        let block = if old == 0 {
            let block = self.new_block(&mut b, 0, BlockKind::Xattr, 0)?;
            rec.blocks = (rec.blocks.get() + 1).into();
            block
        } else {
            self.check_block(old, "xattr block")?;
            self.cow(&mut b, old, BlockKind::Xattr)?
        };
        rec.xattr_block = block.into();
        let h = XattrBlockHeader {
            magic: XATTR_MAGIC.into(),
            used: (body.len() as u32).into(),
            checksum: crc32c::crc32c(&body).into(),
            reserved: 0.into(),
        };
        let mut payload = vec![0u8; PAYLOAD_SIZE as usize];
        payload[..XATTR_HEADER_SIZE].copy_from_slice(h.as_bytes());
        payload[XATTR_HEADER_SIZE..][..body.len()].copy_from_slice(&body);
        self.img.write(block_off(block), &payload)?;
        Ok(())
    }

    pub fn xattr_get(&self, rec: &Inode, name: &[u8]) -> Result<Vec<u8>> {
        self.xattr_load(rec)?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(Error::NoAttr)
    }

    pub fn xattr_list(&self, rec: &Inode) -> Result<Vec<Vec<u8>>> {
        Ok(self.xattr_load(rec)?.into_iter().map(|(n, _)| n).collect())
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
        if value.len() > XATTR_CAPACITY - XATTR_ENTRY_HEADER_SIZE - name.len() {
            return Err(Error::ArgTooBig);
        }
        let mut attrs = self.xattr_load(rec)?;
        let pos = attrs.iter().position(|(n, _)| n == name);
        match (pos, mode) {
            (Some(_), SetMode::Create) => return Err(Error::Exists),
            (None, SetMode::Replace) => return Err(Error::NoAttr),
            (Some(i), _) => attrs[i].1 = value.to_vec(),
            (None, _) => attrs.push((name.to_vec(), value.to_vec())),
        }
        self.xattr_store(tx, rec, &attrs)
    }

    pub fn xattr_remove(&self, tx: &Tx, rec: &mut Inode, name: &[u8]) -> Result<()> {
        let mut attrs = self.xattr_load(rec)?;
        let pos = attrs
            .iter()
            .position(|(n, _)| n == name)
            .ok_or(Error::NoAttr)?;
        attrs.remove(pos);
        self.xattr_store(tx, rec, &attrs)
    }

    /// The xattr block of an inode, validated (fsck).
    pub(super) fn xattr_validate(&self, rec: &Inode) -> Result<()> {
        self.xattr_load(rec).map(|_| ())
    }
}
