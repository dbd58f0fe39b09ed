// Keys encrypted with the web app's algorithm (its src/lib/crypto.ts), with Node's crypto.
// Usage: node webapp_crypto.cjs < [{"secret": ..., "plaintext": ...}, ...]
// Prints the same list with "ciphertext" added: base64 of salt (64 bytes, random, unused
// by the key), IV (16), GCM tag (16) and the ciphertext, under PBKDF2-SHA256(secret,
// 'salt', 100000 iterations, 32 bytes).
'use strict'
const crypto = require('crypto')

const items = JSON.parse(require('fs').readFileSync(0, 'utf8'))
const keys = new Map()
for (const item of items) {
  if (!keys.has(item.secret)) {
    keys.set(item.secret, crypto.pbkdf2Sync(item.secret, 'salt', 100000, 32, 'sha256'))
  }
  const iv = crypto.randomBytes(16)
  const cipher = crypto.createCipheriv('aes-256-gcm', keys.get(item.secret), iv)
  const body = Buffer.concat([cipher.update(item.plaintext, 'utf8'), cipher.final()])
  item.ciphertext = Buffer.concat([crypto.randomBytes(64), iv, cipher.getAuthTag(), body]).toString('base64')
}
process.stdout.write(JSON.stringify(items, null, 1) + '\n')
